"""The memory a request needs, estimated before anything is allocated, against the memory there is.

Without it an --image-size or a data set too large for the machine fails late: a numpy traceback
(`ArrayMemoryError: 5.46 TiB`), a job killed by the OOM killer after its start-up, or a machine pushed
into swap. What the stages hold (hpcviz.data, hpcviz.placement, hpcviz.evaluate, hpcviz.pack):

- the images, N x 3 x S x S bytes (uint8). Every source but a packed file at the run's size is decoded
  whole (builtin, CIFAR-10, image folders; a packed file of another size is read whole at its own size
  first); with several processes on a node, a node-shared copy besides; with --data-placement device on
  CPUs, one copy per process. A packed file at the run's size is read by rows (auto, stream).
- drawing the builtin set: about 122 bytes per pixel of a chunk (2**20 pixels, or one image when larger)
  of float64 temporaries (measured with tracemalloc; make_builtin bounds its chunks that way).
- on a CPU, the forward passes (float32): training keeps every layer's output of a batch for the backward,
  plus the largest layer's input and output twice; evaluation about three times the largest input and output
  (the residual kept, oneDNN's reorders). Per image, from a forward of the architecture at that size on the
  meta device (no memory). Against the peak RSS of a batch of 16 (ResNet-20 at 128 px, ResNet-18 at 224 px):
  training 1.02x and 1.10x of it, evaluation 0.7x and 2.5x.
- on a GPU: only the images placed there with --data-placement device (auto falls back when they do not fit;
  a batch that does not fit is CUDA's own out-of-memory error in the job).

The limit: this machine's MemAvailable for what runs here (local runs, imports, evaluations, packing); on
SLURM the job's node is not this one, so the memory the job asks for (--mem-gb, else the profile's mem_gb),
and no check when neither is set. A refusal is one line: the estimate, its largest parts, the limit.
"""
from __future__ import annotations

import functools
import math
import shutil
import subprocess
from dataclasses import dataclass, field

import torch

from ..config import LaunchConfig, TrainConfig
from ..errors import InputError
from ..files import fmt_bytes
from ..models import build_model
from .placement import available_host_bytes
from .sources import SourceFacts

__all__ = ["MemoryRefused", "Need", "images_in", "forward_bytes", "train_need", "check_train", "import_need",
           "eval_need", "pack_need", "host_limit", "gpu_limit", "check"]

_BUILTIN_TEMP = 122        # bytes per pixel of a drawn chunk (tracemalloc: 122 at 1024 and 2048 px, 104 at 256)
_BUILTIN_CHUNK = 2 ** 20   # pixels per chunk of make_builtin (at least one image)
GiB = 2 ** 30


class MemoryRefused(InputError):
    """A request whose data or batches cannot fit in the memory there is."""


@dataclass
class Need:
    """Bytes a request holds at its peak, by part (what, bytes)."""
    parts: list[tuple[str, int]] = field(default_factory=list)

    def add(self, what: str, nbytes: float) -> None:
        if nbytes > 0:
            self.parts.append((what, int(nbytes)))

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)


def images_in(spec: str, facts: SourceFacts) -> int | None:
    """The number of images of a source, where it is known without decoding."""
    return sum(facts.per_class) if facts.per_class is not None else facts.n


def _source(need: Need, spec: str, facts: SourceFacts, n: int, size: int) -> None:
    """The decoded set at `size` and what decoding it holds besides: a packed file of another size read whole,
    the builtin set's drawing temporaries."""
    need.add(f"{n:,} images at {size} px", n * 3 * size * size)
    if facts.stored is not None and facts.stored != (size, size):
        need.add(f"the source read whole at {facts.stored[0]}x{facts.stored[1]} px",
                 n * 3 * facts.stored[0] * facts.stored[1])
    if spec == "builtin" or spec.startswith("builtin:"):
        need.add("drawing them", _BUILTIN_TEMP * min(n * size * size, max(size * size, _BUILTIN_CHUNK)))


@functools.lru_cache(maxsize=32)
def forward_bytes(arch: str, stem: str, classes: int, size: int) -> tuple[int, int]:
    """(evaluation, training) bytes per image of a float32 forward (training: with what its backward keeps),
    from the layers' shapes at `size` on the meta device."""
    with torch.device("meta"):
        model = build_model(arch, classes, stem).eval()
    outputs, largest = [], [0]

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        outputs.append(output.numel())
        largest[0] = max(largest[0], inputs[0].numel() + output.numel())
    hooks = [m.register_forward_hook(hook) for m in model.modules() if not any(m.children())]
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, size, size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return 4 * 3 * largest[0], 4 * (sum(outputs) + 2 * largest[0])


def train_need(cfg: TrainConfig, launch: LaunchConfig, facts: SourceFacts, train: bool = True) -> tuple[Need, Need]:
    """(host memory of one node, memory of each GPU) of a training job (`train` False: an import, which only
    evaluates), for a launch that check_launch resolved."""
    host, gpu = Need(), Need()
    n = images_in(cfg.data, facts)
    if n is None:
        return host, gpu
    size, gpus = cfg.image_size, launch.gpus or 0
    ranks = gpus or max(1, launch.nproc)
    on_cpu = cfg.device == "cpu" or not gpus
    data = n * 3 * size * size
    packed_at_size = cfg.data.lower().endswith((".h5", ".hdf5")) and facts.stored == (size, size)
    if not packed_at_size:
        _source(host, cfg.data, facts, n, size)
        if ranks > 1:
            host.add("their node-shared copy", data)
    elif cfg.data_placement == "host":
        host.add(f"{n:,} images at {size} px (node-shared copy)", data)
    if cfg.data_placement == "device":
        if not on_cpu:
            gpu.add(f"{n:,} images at {size} px (--data-placement device)", data)
        elif ranks > 1 or packed_at_size:
            host.add(f"one copy per process ({ranks}, --data-placement device)", data * ranks)
    if on_cpu:
        classes = len(facts.classes) if facts.classes else 10
        evaluation, training = forward_bytes(cfg.arch, cfg.resolved_stem(), classes, size)
        world = ranks * max(1, launch.nodes)
        eval_batch = min(cfg.eval_batch_size, math.ceil(n / world)) * ranks
        step = ("evaluation batches", eval_batch * evaluation)
        if train and cfg.batch_size / max(1, launch.nodes) * training > step[1]:
            step = (f"a training step of {cfg.batch_size // max(1, launch.nodes)} images", cfg.batch_size //
                    max(1, launch.nodes) * training)
        host.add(*step)
    return host, gpu


def check_train(cfg: TrainConfig, launch: LaunchConfig, facts: SourceFacts) -> None:
    """A training request's node and GPU memory (train_need) against the limits, for a resolved launch."""
    host, gpu = train_need(cfg, launch, facts)
    what = f"--image-size {cfg.image_size} with --data {cfg.data}"
    check(what, host, host_limit(launch), "a smaller --image-size or --batch-size, a packed file read by rows "
          "(jobs/pack_data.py, then --data FILE.h5 --data-placement stream), or more memory (--mem-gb on SLURM)")
    if launch.cluster != "slurm":
        check(f"{what} --data-placement device", gpu, gpu_limit(),
              "--data-placement auto (it keeps what does not fit off the GPU) or stream")


def import_need(cfg: TrainConfig, facts: SourceFacts, on_cpu: bool) -> Need:
    """Host memory of jobs/import_model.py: the data as training places it in one process, and its evaluation."""
    launch = LaunchConfig(cluster="local", gpus=0 if on_cpu else 1, nproc=1)
    return train_need(cfg, launch, facts, train=False)[0]


def eval_need(spec: str, facts: SourceFacts, size: int, arch: str, stem: str, classes: int, batch: int,
              on_cpu: bool) -> Need:
    """Host memory of jobs/evaluate.py: the whole source decoded at the run's size, and (CPU) its batches."""
    need = Need()
    n = images_in(spec, facts)
    if n is not None:
        _source(need, spec, facts, n, size)
        if on_cpu:
            need.add(f"evaluation batches of {min(batch, n)} images", min(batch, n) * forward_bytes(
                arch, stem, classes, size)[0])
    return need


def pack_need(spec: str, facts: SourceFacts, size: int | None) -> Need:
    """Host memory of jobs/pack_data.py: builtin and CIFAR-10 decoded whole; folders and packed files streamed,
    at least one image and its resize (float32 in and out) at a time."""
    need = Need()
    n = images_in(spec, facts)
    streamed = not (spec == "builtin" or spec.startswith(("builtin:", "cifar10:", "cifar10-test:")))
    if size is None or n is None:
        return need
    if streamed:
        need.add(f"one image at {size} px and its resize", 9 * 3 * size * size)
    else:
        _source(need, spec, facts, n, size)
    return need


def host_limit(launch: LaunchConfig | None = None) -> tuple[int, str] | None:
    """(bytes, what they are) a request's host memory must fit in; None: not known here (SLURM, no --mem-gb)."""
    if launch is None or launch.cluster != "slurm":
        return available_host_bytes(), "available on this machine (MemAvailable)"
    mem = launch.mem_gb  # check_launch resolved it from the profile
    return (mem * GiB, f"per node with --mem-gb {mem}") if mem else None


def gpu_limit() -> tuple[int, str] | None:
    """The least free memory of this machine's GPUs (nvidia-smi: no CUDA context in the launcher), or None."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
        free = [int(v) * 2 ** 20 for v in out.stdout.split() if v.strip().isdigit()]
    except (OSError, subprocess.SubprocessError):
        return None
    return (min(free), "free on a GPU here (nvidia-smi)") if out.returncode == 0 and free else None


def check(what: str, need: Need, limit: tuple[int, str] | None, hint: str) -> None:
    """Refuse `need` above `limit` in one line naming `what` (the options that decide it)."""
    if limit is None or need.total <= limit[0]:
        return
    parts = sorted(need.parts, key=lambda p: -p[1])[:3]
    shown = "; ".join(f"{w}: {fmt_bytes(b)}" for w, b in parts)
    raise MemoryRefused(f"{what}: needs about {fmt_bytes(need.total)} of memory ({shown}), {fmt_bytes(limit[0])} "
                        f"{limit[1]}; hint: {hint}")
