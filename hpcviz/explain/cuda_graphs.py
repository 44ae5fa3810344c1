"""The inversion's step on static shapes, captured as CUDA graphs on a GPU.

A CUDA graph replays a recorded sequence of kernels on fixed buffers: one launch instead of the few hundred
small kernels of a forward and backward through a ResNet, which is what a step on a GPU costs when rows are
few. It needs static shapes, and the inversion's batch shrinks as its rows converge. `PaddedSteps` therefore
rounds each block's share of the running rows up to a bucket (`bucket`: exact up to 8, then powers of two),
repeating the group's last row into the padding and dropping the padded results: a whole run visits at most
about log2(rows) shapes per block, and the batches of a shard revisit the same ones.

With graphs on (CUDA only) each shape's value-and-gradient is warmed up on a side stream, captured once into a
memory pool shared by all the shapes, and replayed with the rows copied into its static input; its outputs
are copied out at once, so a later replay of another shape reusing the pool's memory cannot change them. A
capture that fails falls back to the eager step for the rest of the run, with one warning. Without graphs
(CPUs) the padding only costs, so the inversion does not use this class there; padded and unpadded steps
are equal (tested on the CPU).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..log import LOGGER
from .rowopt import ValueGrad, with_grad

log = logging.getLogger(LOGGER)
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class RowObjective(Protocol):
    """What PaddedSteps needs of an objective (hpcviz.inversion.Objective)."""

    def counts(self, rows: torch.Tensor) -> list[int]: ...

    def evaluate(self, x: torch.Tensor, rows: torch.Tensor,
                 counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]: ...


def bucket(n: int) -> int:
    """The padded size of a group of n rows: n up to 8, then the next power of two (0 stays 0)."""
    return n if n <= 8 else 1 << (n - 1).bit_length()


class PaddedSteps:
    """A ValueGrad for hpcviz.rowopt: (f, gradient, err) of the rows, computed on padded groups (see the
    module docstring); `graphs`: capture each shape as a CUDA graph (ignored off CUDA)."""

    def __init__(self, objective: RowObjective, device: torch.device, graphs: bool = True) -> None:
        self.objective = objective
        self.graphs = graphs and device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.steps: dict[tuple[int, ...], Step] = {}
        self.captured = 0  # shapes captured as graphs (for the benchmark and tests)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        counts = self.objective.counts(rows)
        padded = tuple(bucket(k) for k in counts)
        take, keep, start, at = [], [], 0, 0
        for k, p in zip(counts, padded):
            if k:
                idx = torch.arange(start, start + k)
                take.append(torch.cat([idx, idx[-1:].expand(p - k)]))  # the group's last row fills its padding
                keep.append(torch.arange(at, at + k))
                start, at = start + k, at + p
        t, kept = torch.cat(take).to(rows.device), torch.cat(keep).to(rows.device)
        step = self.steps.get(padded) or self._build(padded, x[t], rows[t])
        f, g, e = step(x[t], rows[t])
        return f[kept], g[kept], e[kept]

    def _build(self, padded: tuple[int, ...], x: torch.Tensor, rows: torch.Tensor) -> Step:
        sizes = list(padded)
        eager: ValueGrad = with_grad(lambda xx, rr: self.objective.evaluate(xx, rr, sizes))
        step: Step = eager
        if self.graphs:
            try:
                step = _capture(eager, x, rows, self.pool)
                self.captured += 1
            except RuntimeError as e:  # an op that cannot be captured: eager from now on
                log.warning("inversion: CUDA graph capture failed (%s); continuing without graphs",
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                self.graphs = False
        self.steps[padded] = step
        return step


def _capture(fn: ValueGrad, x: torch.Tensor, rows: torch.Tensor, pool: Any) -> Step:
    """fn on static copies of x and rows, warmed up on a side stream, then captured as one CUDA graph."""
    static_x, static_rows = x.clone(), rows.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # cuDNN's algorithm choice and the allocator settle outside the graph
            fn(static_x, static_rows)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(static_x, static_rows)

    def replay(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        static_x.copy_(x)
        static_rows.copy_(rows)
        graph.replay()
        f, g, e = out
        return f.clone(), g.clone(), e.clone()
    return replay
