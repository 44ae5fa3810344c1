"""Every block's output in one forward pass.

Blocks are named as in `models.block_names`: 'conv1' is the stem's output after its
ReLU (before the max-pool of the ImageNet stem), 'layerX.Y' the output of residual
block Y of stage X (after the block's final ReLU). Hooks are removed in `finally`.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from ..errors import InputError
from ..models import block_names


class UnknownBlockError(InputError):
    """A block name that the model does not have."""


def block_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> the module whose forward output is that block's activation."""
    mods = dict(model.named_modules())
    # the stem's ReLU is the top-level `relu`: torchvision's blocks each own their ReLU
    return {name: (mods["relu"] if name == "conv1" else mods[name]) for name in block_names(model)}


def resolve_blocks(model: nn.Module, blocks: Sequence[str] | None, flag: str = "--blocks") -> list[str]:
    """The requested block names in forward order (all when None); unknown names are an error naming
    `flag`, the option they came from."""
    names = block_names(model)
    if not blocks:
        return names
    unknown = [b for b in blocks if b not in names]
    if unknown:
        raise UnknownBlockError(f"{flag} {','.join(unknown)}: not blocks of this model; valid: {', '.join(names)}; "
                                f"hint: e.g. {flag} {names[-1]}")
    return [n for n in names if n in set(blocks)]


@torch.no_grad()
def dump_activations(model: nn.Module, x: torch.Tensor, blocks: Sequence[str] | None = None,
                     amp: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits (B, K) float32, {block: activation (B, C, h, w) float32}) for normalised input x (B, 3, H, W)."""
    names = resolve_blocks(model, blocks)
    modules = block_modules(model)
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            # a copy: the stem's ReLU and the blocks work in place on tensors that later ops reuse
            acts[name] = output.detach().float().clone()
        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(keep(name)))
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else nullcontext()
        with ctx:
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits.float(), {n: acts[n] for n in names}
