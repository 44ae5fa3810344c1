"""Counting the ops that make a host wait for a GPU, on a CPU: what `torch.cuda.set_sync_debug_mode` would
report on a GPU, seen through a TorchDispatchMode (every aten op) and the Python-level ways out of a tensor.

Counted: `aten._local_scalar_dense` (`.item()`, `bool(t)`, `int(t)`, `float(t)`), ops whose output size
depends on the data (`nonzero`, `masked_select`, `unique`, `repeat_interleave` without a size,
`bincount`, `histc`), `equal`, indexing or index_put with a boolean mask (torch turns the mask into
`nonzero`), and device->host copies: `.tolist()`, `.numpy()`, `.cpu()` and `.to(<cpu>)` (on a CPU run
all tensors are host tensors, so every such call counts: the hot loops must make none).
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.repeat_interleave.Tensor, aten.bincount.default, aten.histc.default, aten.equal.default,
            aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _bool_index(args) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))


class SyncCounter(TorchDispatchMode):
    """Counts syncing ops per `phase` (a label the caller moves along: "setup", "loop", "check", ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "setup"
        self.counts: Counter[tuple[str, str]] = Counter()

    def hit(self, what: str) -> None:
        self.counts[(self.phase, what)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING:
            self.hit(str(func.overloadpacket.__name__))
        elif func in _INDEXING and _bool_index(args):
            self.hit(f"{func.overloadpacket.__name__}[bool]")
        return func(*args, **(kwargs or {}))

    def total(self, phase: str | None = None) -> int:
        return sum(n for (p, _), n in self.counts.items() if phase is None or p == phase)

    def by_op(self, phase: str | None = None) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (p, w), n in self.counts.items():
            if phase is None or p == phase:
                out[w] += n
        return dict(out)


@contextlib.contextmanager
def counting(monkeypatch=None):
    """A SyncCounter active for the block, with the Python-level device->host exits counted too."""
    counter = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "to")}

    def wrap(name):
        orig = originals[name]

        def f(self, *a, **k):
            if name != "to" or _to_cpu(a, k):
                counter.hit(f"Tensor.{name}")
            return orig(self, *a, **k)
        return f
    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with counter:
            yield counter
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def _to_cpu(a, k) -> bool:
    dev = k.get("device", a[0] if a else None)
    if isinstance(dev, str):
        return dev.startswith("cpu")
    return isinstance(dev, torch.device) and dev.type == "cpu"
