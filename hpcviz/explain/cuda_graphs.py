"""The inversion's step on static shapes, captured as CUDA graphs on a GPU, kept for a whole array task.

A CUDA graph replays a recorded sequence of kernels on fixed buffers: one launch instead of the few hundred
small kernels of a forward and backward through a ResNet, which is what a step on a GPU costs when rows are
few. It needs static shapes, and the inversion's batch shrinks as its rows converge. So hpcviz.rowopt lays
the running rows out only at its checks, each block's rows padded to one shared power of two
(`rowopt.shared_pow2`): a call visits at most ceil(log2(images)) + 1 shapes per set of blocks still
running, and the task's later batches revisit the same ones.

`StepCache` is made once per array task and passed to every `invert` call. It keeps the objective (its
folded forward and the targets in static buffers that each batch's targets are copied into) and one step
per shape: on CUDA with graphs on, warmed up on a side stream, captured once into a memory pool shared by
all shapes, and replayed with the x and image numbers copied into its static inputs; its outputs are
copied out at once, so a later replay of another shape reusing the pool cannot change them. A capture
that fails falls back to eager steps for the rest of the task, with one warning. Off CUDA the same path
runs with eager steps (`captured` then counts the shapes a GPU would have captured), so a CPU test sees
what a GPU would do; CPUs lay rows out without padding by default (padding only costs there).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import torch

from ..log import LOGGER
from .rowopt import Bucket, ValueGrad, exact, shared_pow2, with_grad

log = logging.getLogger(LOGGER)
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class StepObjective(Protocol):
    """What StepCache needs of an objective (hpcviz.explain.inversion.Objective)."""

    n: int                              # images of the current batch: row r is image r % n
    phase: str                          # what else the step's graph depends on (the soft or the hard max-pool)

    def evaluate(self, x: torch.Tensor, images: torch.Tensor,
                 sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]: ...


class StepCache:
    """Per array task: the inversion's objective and one (f, gradient, err) step per padded shape.

    graphs: capture the steps as CUDA graphs (ignored off CUDA). pad: "auto" (shared powers of two on CUDA,
    none elsewhere), "pow2" or "exact" (tests: a GPU's layout on a CPU)."""

    def __init__(self, graphs: bool = True, pad: str = "auto") -> None:
        if pad not in ("auto", "pow2", "exact"):
            raise ValueError(f"pad {pad!r}: not one of auto, pow2, exact")
        self.graphs, self.pad = graphs, pad
        self.kept: dict[str, tuple[Hashable, Any]] = {}
        self.objective: Any = None
        self.pool: Any = None
        self.steps: dict[tuple[tuple[int, ...], str], Step] = {}  # (sizes, the objective's phase) -> step
        self.captured = 0  # shapes captured as graphs (on CUDA), or that would have been (elsewhere)

    def bucket(self, device: torch.device) -> Bucket:
        pow2 = self.pad == "pow2" or (self.pad == "auto" and device.type == "cuda")
        return shared_pow2 if pow2 else exact

    def get(self, what: str, key: Hashable, make: Callable[[], Any],
            fits: Callable[[Any], bool] = lambda _: True) -> Any:
        """The `what` ("plan", "objective") made for `key` (the model, blocks, input size, config), made anew
        when the key differs from the last one or the kept one does not fit; a new objective drops the steps."""
        kept = self.kept.get(what)
        if kept is None or kept[0] != key or not fits(kept[1]):
            kept = self.kept[what] = (key, make())
            if what == "objective":
                self.objective, self.steps = kept[1], {}
        return kept[1]

    def value_grad(self, device: torch.device) -> ValueGrad:
        """A rowopt ValueGrad (x, rows, sizes) -> (f, df/dx, err) of the current objective."""
        def value_grad(x: torch.Tensor, rows: torch.Tensor,
                       sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            images = rows % self.objective.n  # eager, outside the graph: the batch size is not part of it
            key = (sizes, self.objective.phase)
            step = self.steps.get(key) or self._build(key, x, images, device)
            return step(x, images)
        return value_grad

    def _build(self, key: tuple[tuple[int, ...], str], x: torch.Tensor, images: torch.Tensor,
               device: torch.device) -> Step:
        objective, sizes = self.objective, key[0]
        eager: Step = with_grad(lambda xx, ii: objective.evaluate(xx, ii, sizes))
        step = eager
        self.captured += 1
        if self.graphs and device.type == "cuda":
            try:
                self.pool = self.pool if self.pool is not None else torch.cuda.graph_pool_handle()
                step = _capture(eager, x, images, self.pool)
            except RuntimeError as e:  # an op that cannot be captured: eager from now on
                log.warning("inversion: CUDA graph capture failed (%s); continuing without graphs",
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                self.graphs = False
        self.steps[key] = step
        return step


def _capture(fn: Step, x: torch.Tensor, images: torch.Tensor, pool: Any) -> Step:
    """fn on static copies of x and images, warmed up on a side stream, then captured as one CUDA graph."""
    static_x, static_images = x.clone(), images.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # cuDNN's algorithm choice and the allocator settle outside the graph
            fn(static_x, static_images)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(static_x, static_images)

    def replay(x: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        static_x.copy_(x)
        static_images.copy_(images)
        graph.replay()
        f, g, e = out
        return f.clone(), g.clone(), e.clone()
    return replay
