"""The distributed environment: the only module that reads SLURM_*/RANK or calls torch.distributed.

Every function is safe to call when not distributed (one process): collectives
become no-ops and `is_main()` is True. Sources, in order of precedence:

1. torchrun / explicit:  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
2. submitit's local executor: SUBMITIT_LOCAL_GLOBALID, SUBMITIT_LOCAL_NTASKS, ...
3. SLURM (srun tasks): SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS or SLURM_NTASKS,
   master = first host of SLURM_JOB_NODELIST, port derived from SLURM_JOB_ID
4. alone
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as td

DEFAULT_PORT = 29500


class DistError(RuntimeError):
    """The distributed environment is inconsistent or could not be initialised."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "single"          # torchrun | submitit-local | slurm | single
    local_world_size: int = 1       # processes on this node (to share its CPU threads)


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise DistError(f"SLURM_JOB_NODELIST {nodelist!r}: cannot parse; expected e.g. 'node[01-04]' or 'node1,node2'")
    prefix, _, ranges = m.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def port_for_job(job_id: str) -> int:
    """A port derived from the job id, so concurrent jobs on one node rarely collide."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 40000


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", DEFAULT_PORT)), "torchrun",
                       int(env.get("LOCAL_WORLD_SIZE", "1")))
    if "SUBMITIT_LOCAL_GLOBALID" in env:
        return DistEnv(int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env.get("SUBMITIT_LOCAL_LOCALID", "0")),
                       int(env.get("SUBMITIT_LOCAL_NTASKS", "1")), "127.0.0.1",
                       int(env.get("MASTER_PORT", port_for_job(env.get("SUBMITIT_LOCAL_JOB_ID", "0")))),
                       "submitit-local", int(env.get("SUBMITIT_LOCAL_NTASKS", "1")))
    if "SLURM_PROCID" in env:
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
        nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), world,
                       env.get("MASTER_ADDR", first_host(nodelist)),
                       int(env.get("MASTER_PORT", port_for_job(env.get("SLURM_JOB_ID", "0")))), "slurm",
                       max(1, world // max(1, nodes)))
    return DistEnv()


_ENV = DistEnv()


def init(device_type: str = "cpu", timeout_s: float = 300.0) -> DistEnv:
    """Join the process group (NCCL on GPUs, gloo on CPU) if there is more than one process."""
    global _ENV
    env = read_env()
    if not 0 <= env.rank < env.world_size:
        raise DistError(f"rank {env.rank} outside world size {env.world_size} ({env.source}); "
                        "hint: under SLURM start one task per process with srun")
    _ENV = env
    if env.world_size > 1 and not td.is_initialized():
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.master_addr, str(env.master_port)
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            if env.local_rank >= torch.cuda.device_count():
                raise DistError(f"local rank {env.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                                f"hint: ask for at most --gpus {torch.cuda.device_count()} per node")
            torch.cuda.set_device(env.local_rank)
        td.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                              timeout=datetime.timedelta(seconds=timeout_s))
    return env


def cleanup() -> None:
    global _ENV
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
    _ENV = DistEnv()


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_dist() else 0


def world_size() -> int:
    return td.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return _ENV.local_rank


def local_world_size() -> int:
    return _ENV.local_world_size


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        td.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (and return it); identity alone."""
    if is_dist():
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def any_ranks(flags: list[bool], device: torch.device | str = "cpu") -> list[bool]:
    """flags[i] is True on every rank if it is True on any rank: how all ranks agree to stop at one step."""
    if not is_dist():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def restart_count() -> int:
    """How often SLURM has requeued this job (preemption, time limit); 0 outside SLURM."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` when there are several processes; `model` itself alone."""
    if not is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP does this at the start of each forward, so after the last step of an epoch the
    ranks differ only by their local running statistics; syncing them before evaluating
    or saving makes every rank hold rank 0's model, exactly what the next step would see.
    """
    if is_dist():
        for b in module.buffers():
            td.broadcast(b, src=0)


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def pick_device(requested: str) -> torch.device:
    """auto -> this rank's GPU if there is one, else CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistError("--device cuda: no CUDA device is visible; hint: use --device cpu or --device auto")
    n = torch.cuda.device_count()
    if _ENV.local_rank >= n:
        raise DistError(f"local rank {_ENV.local_rank} has no GPU: this node has {n}; "
                        f"hint: ask for at most --gpus {n} per node")
    return torch.device("cuda", _ENV.local_rank)
