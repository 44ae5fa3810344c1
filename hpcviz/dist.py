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

import contextlib
import datetime
import inspect
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as td

from .errors import InputError, JobError

DEFAULT_PORT = 29500


class DistError(JobError):
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
    host: str = ""                  # this node's name, for messages


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


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE, one entry per node: '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise DistError(f"SLURM_TASKS_PER_NODE {spec!r}: cannot parse; expected e.g. '4' or '2(x3),1'")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def port_for_job(job_id: str, restart: int = 0) -> int:
    """A port derived from the job id, so concurrent jobs on one node rarely collide, and from how often it was
    requeued: a requeued run never rendezvouses on its killed predecessor's port, which a process of that run
    may still hold (seen in CI: the new rank 1 blocked connecting there until the time limit)."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + (int(digits) + 7919 * restart) % 40000


# launchers that set RANK/WORLD_SIZE but not LOCAL_RANK often say the local rank in their own words
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK")
_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")


def _slurm_local_size(env: Mapping[str, str]) -> int | None:
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    per_node = tasks_per_node(spec)
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return per_node[node] if node < len(per_node) else per_node[-1]


def _read_torchrun(env: Mapping[str, str]) -> DistEnv:
    """RANK/WORLD_SIZE set (torchrun, or a launcher like it): guess what it left out, or refuse."""
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_size = next((int(env[k]) for k in _LOCAL_SIZE_VARS if env.get(k)), None)
    if local_size is None and env.get("SLURM_PROCID") == env["RANK"]:
        local_size = _slurm_local_size(env)  # an srun wrapper that exported RANK from SLURM_PROCID
    if env.get("LOCAL_RANK"):
        local = int(env["LOCAL_RANK"])
    elif env.get("SLURM_LOCALID") and env.get("SLURM_PROCID") == env["RANK"]:
        local = int(env["SLURM_LOCALID"])
    elif any(env.get(k) for k in _LOCAL_RANK_VARS):
        local = int(next(env[k] for k in _LOCAL_RANK_VARS if env.get(k)))
    elif world == 1:
        local = 0
    elif local_size:
        local = rank % local_size  # ranks numbered node by node, as every launcher does
    else:
        raise DistError(f"RANK={rank} WORLD_SIZE={world} without LOCAL_RANK: cannot tell which GPU is this "
                        "process's; hint: export LOCAL_RANK (and LOCAL_WORLD_SIZE), or start with torchrun or srun")
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    elif world == 1 or local_size == world or env.get("SLURM_JOB_NUM_NODES") == "1":
        addr = "127.0.0.1"  # every rank on this node
    elif env.get("SLURM_JOB_NODELIST"):
        addr = first_host(env["SLURM_JOB_NODELIST"])
    else:
        raise DistError(f"RANK={rank} WORLD_SIZE={world} without MASTER_ADDR, and the ranks may span nodes: "
                        "127.0.0.1 would hang; hint: export MASTER_ADDR=<host of rank 0> (and MASTER_PORT)")
    port = int(env.get("MASTER_PORT") or (port_for_job(env["SLURM_JOB_ID"], _restarts(env)) if env.get("SLURM_JOB_ID")
                                          else DEFAULT_PORT))
    return DistEnv(rank, local, world, addr, port, "torchrun", local_size or 1)


def _read_slurm(env: Mapping[str, str]) -> DistEnv:
    if "SLURM_STEP_ID" not in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        # the batch script (or an salloc shell) of a multi-task allocation: the other ranks never start
        raise DistError(f"inside a SLURM allocation of {env['SLURM_NTASKS']} tasks "
                        f"(job {env.get('SLURM_JOB_ID', '?')}) "
                        "but not started by srun: this process would wait for ranks that never start; hint: "
                        "srun python jobs/launch_train.py --cluster inline ..., or submit with --cluster slurm")
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    local_size = _slurm_local_size(env)
    if local_size is None:
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
        local_size = max(1, world // max(1, nodes))
    return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0") or 0), world,
                   env.get("MASTER_ADDR") or first_host(nodelist),
                   int(env.get("MASTER_PORT") or port_for_job(env.get("SLURM_JOB_ID", "0"), _restarts(env))), "slurm",
                   local_size)


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Who this process is (see the module docstring for the sources); a DistError when it cannot be told."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        found = _read_torchrun(env)
    elif "SUBMITIT_LOCAL_GLOBALID" in env:
        found = DistEnv(int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env.get("SUBMITIT_LOCAL_LOCALID", "0")),
                        int(env.get("SUBMITIT_LOCAL_NTASKS", "1")), "127.0.0.1",
                        int(env.get("MASTER_PORT", port_for_job(env.get("SUBMITIT_LOCAL_JOB_ID", "0")))),
                        "submitit-local", int(env.get("SUBMITIT_LOCAL_NTASKS", "1")))
    elif "SLURM_PROCID" in env:
        found = _read_slurm(env)
    else:
        found = DistEnv()
    return replace(found, host=env.get("SLURMD_NODENAME") or socket.gethostname())


_ENV = DistEnv()


def init(device_type: str = "cpu", timeout_min: float = 30.0, alone: bool = False) -> DistEnv:
    """Join the process group (NCCL on GPUs, gloo on CPU) if there is more than one process.

    `timeout_min` covers the rendezvous and the first collective, when some ranks may still be
    loading data (`settle` shortens it afterwards). `alone`: this process is the whole job (the
    debug executor), whatever SLURM or torchrun variables it inherited."""
    global _ENV
    env = DistEnv(host=socket.gethostname()) if alone else read_env()
    if not 0 <= env.rank < env.world_size:
        raise DistError(f"rank {env.rank} outside world size {env.world_size} ({env.source}); "
                        "hint: under SLURM start one task per process with srun")
    _ENV = env
    if env.world_size > 1 and not td.is_initialized():
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.master_addr, str(env.master_port)
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "gloo" and env.world_size > env.local_world_size:
            _check_gloo_address(env)
        kwargs: dict[str, Any] = {}
        if device_type == "cuda":
            device = pick_device("cuda")
            torch.cuda.set_device(device)
            if "device_id" in inspect.signature(td.init_process_group).parameters:
                kwargs["device_id"] = device  # binds NCCL to it at once (eager init, no guessing in barrier)
        td.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                              timeout=datetime.timedelta(minutes=timeout_min), **kwargs)
        if device_type == "cuda":
            _refuse_shared_gpus()
    return env


def _check_gloo_address(env: DistEnv) -> None:
    """Across nodes gloo binds to the address this host's name resolves to: a loopback one (Debian's
    '127.0.1.1 host' line) would hang the job; an unresolvable master too."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    try:
        master = socket.gethostbyname(env.master_addr)
        mine = socket.gethostbyname(socket.gethostname())
    except OSError as e:
        raise DistError(f"rank {env.rank} on {env.host}: cannot resolve {socket.gethostname()!r} or MASTER_ADDR "
                        f"{env.master_addr!r} ({e}); hint: fix the names, or set MASTER_ADDR to an address") from None
    if mine.startswith("127.") and not master.startswith("127."):  # a loopback master: one node after all
        raise DistError(f"rank {env.rank} on {env.host}: the host name resolves to {mine} (loopback), so gloo "
                        "would listen where other nodes cannot reach it; hint: export GLOO_SOCKET_IFNAME=<the "
                        "node's network interface>, e.g. eth0 or ib0")


def settle(timeout_min: float) -> None:
    """After the first collective: a shorter timeout for every later one, so a hung rank ends the job
    in minutes, not in the long start-up timeout (torch versions without set_timeout keep the long one)."""
    if not is_dist():
        return
    import warnings

    from torch.distributed import distributed_c10d as c10d
    setter = getattr(td, "set_timeout", None) or getattr(c10d, "_set_pg_timeout", None)
    if setter is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            setter(datetime.timedelta(minutes=timeout_min))


def _refuse_shared_gpus() -> None:
    """Two ranks of one node on one GPU (not bound, e.g. 2 tasks but 1 GPU visible to each) crash NCCL with an
    obscure message: say which ranks share which GPU instead."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    mine = (_ENV.host, str(getattr(props, "uuid", "")) or f"{props.name}:{torch.cuda.current_device()}")
    seen: list[Any] = [None] * _ENV.world_size
    td.all_gather_object(seen, mine)
    owners: dict[tuple[str, str], list[int]] = {}
    for r, key in enumerate(seen):
        owners.setdefault(tuple(key), []).append(r)
    shared = {k: v for k, v in owners.items() if len(v) > 1}
    if shared:
        (host, gpu), ranks = next(iter(shared.items()))
        raise DistError(f"ranks {ranks} on {host} all use GPU {gpu}: each rank needs its own GPU; hint: ask for "
                        "one GPU per task (--gpus N gives N tasks and N GPUs per node), or fewer tasks per node")


def current_env() -> DistEnv:
    """This process's place in the job, as `init` found it."""
    return _ENV


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


def any_ranks(flags: list[bool | torch.Tensor], device: torch.device | str = "cpu") -> list[bool]:
    """flags[i] is True on every rank if it is True on any rank: how all ranks agree to stop at one step.
    A flag may be a 0-d tensor on `device` (read with the others in one copy: one sync, not one each)."""
    device = torch.device(device)
    host = torch.tensor([float(bool(f)) for f in flags if not isinstance(f, torch.Tensor)])
    if device.type == "cuda":  # pinned: the copy to the GPU does not wait (the read-back below is the one sync)
        host = host.pin_memory()
    moved, k = host.to(device, non_blocking=True), iter(range(len(host)))
    t = torch.stack([f.to(device, torch.float32).reshape(()) if isinstance(f, torch.Tensor) else moved[next(k)]
                     for f in flags])
    if is_dist():
        td.all_reduce(t, op=td.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def _restarts(env: Mapping[str, str]) -> int:
    value = env.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def restart_count() -> int:
    """How often SLURM has requeued this job (preemption, time limit); 0 outside SLURM."""
    return _restarts(os.environ)


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


THREADS_VAR = "HPCVIZ_THREADS"  # set by a launcher that runs several single-process jobs here at once


def local_gpus() -> list[str]:
    """The GPUs this process may use, by the names CUDA_VISIBLE_DEVICES gives them (ids, UUIDs or MIG
    names: inside an allocation, its own), else 0..N-1 of torch.cuda.device_count() (no CUDA context)."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible if "CUDA_VISIBLE_DEVICES" in os.environ else [str(i) for i in range(torch.cuda.device_count())]


def cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def share_cores() -> int:
    """Give this process its share of the node's cores instead of all of them (torch's default), so that
    several processes of one node (DDP ranks on CPUs, GPU ranks decoding and gathering data, local array
    tasks) do not fight over them: SLURM's --cpus-per-task when it says so (one task per node included),
    else $HPCVIZ_THREADS, else an even share of this process's affinity mask. Returns the thread count."""
    n = cores()
    for value in (os.environ.get("SLURM_CPUS_PER_TASK", ""), os.environ.get(THREADS_VAR, "")):
        if value.isdigit() and int(value) > 0:
            torch.set_num_threads(max(1, min(n, int(value))))
            return torch.get_num_threads()
    if local_world_size() > 1:
        torch.set_num_threads(max(1, n // local_world_size()))
    return torch.get_num_threads()


def check_device(requested: str, flag: str = "--device") -> None:
    """--device cuda (or `flag`) where no CUDA device is visible: one InputError line naming the option."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{flag} cuda: no CUDA device is visible here; hint: use {flag} cpu or {flag} auto")


def pick_device(requested: str, flag: str = "--device") -> torch.device:
    """auto -> this rank's GPU if there is one, else CPU. A process that sees one GPU uses it (clusters that
    bind one GPU per task show each task only its own); with several, local rank k uses the k-th. `flag`: the
    option that asked, for the error."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    check_device(requested, flag)
    n = torch.cuda.device_count()
    if n == 1:
        return torch.device("cuda", 0)
    if _ENV.local_rank < n:
        return torch.device("cuda", _ENV.local_rank)
    raise DistError(f"local rank {_ENV.local_rank} of {_ENV.local_world_size} on {_ENV.host or 'this node'} sees "
                    f"{n} GPUs (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): neither the "
                    f"only one nor one per local rank; hint: ask for one GPU per task, or at most --gpus {n} per node")


def describe_device(device: torch.device) -> str:
    """'cuda:0 (NVIDIA H200, CUDA_VISIBLE_DEVICES=3) on host' or 'cpu (8 threads) on host': for logs and manifests."""
    host = _ENV.host or socket.gethostname()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{device} ({name}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) on {host}"
    return f"{device} ({torch.get_num_threads()} threads) on {host}"


@contextlib.contextmanager
def numerics(exact: bool = True) -> Iterator[None]:
    """exact: fp32 convolutions and matmuls without TF32 and deterministic cuDNN kernels, so GPU results
    match the CPU's to float rounding; not exact: TF32 and cuDNN's fastest (autotuned) kernels. Restored after."""
    import warnings
    matmul = torch.backends.cuda.matmul
    with warnings.catch_warnings():  # newer torch prefers fp32_precision; the flag keeps working
        warnings.simplefilter("ignore")
        before = matmul.allow_tf32
        matmul.allow_tf32 = not exact
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=not exact,
                                        deterministic=exact, allow_tf32=not exact):
            yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matmul.allow_tf32 = before


@contextlib.contextmanager
def sync_allowed() -> Iterator[None]:
    """Marks a deliberate host-device sync (the checks every N steps): under
    torch.cuda.set_sync_debug_mode('error') everything else that syncs raises."""
    if not torch.cuda.is_initialized():  # a CPU run: asking for the mode would initialise CUDA
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)
