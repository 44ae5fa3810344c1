"""viz/plan.json, typed: which images each array task visualizes, and with what.

The plan belongs to the run it is in: its paths are relative to the run directory and its request
carries no run directory, so a copied run plans, retries and collates itself, never its source.
A shard belongs to the plan when its root attributes hold the plan's `SHARD_KEYS` and its /index
holds the plan's positions: the one rule that `--fresh`, skipping, collation, the report, `--status`
and `inspect_results` all use.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import VizConfig, config_from_dict, config_to_dict

# what a shard must agree with to be this plan's (each is also a root attr of every shard)
SHARD_KEYS = ("checkpoint_sha256", "dataset_fingerprint", "split", "blocks", "deconv_blocks", "paths",
              "invert_blocks", "invert_steps", "invert_target", "invert_solver", "prior", "fast", "topk",
              "exact")
# keys added after shards existed: a shard without the attr was made with this value (no dataset examples)
_BEFORE: dict[str, Any] = {"topk": 0, "exact": False, "featviz_blocks": []}


@dataclass
class Plan:
    config: VizConfig                 # the request (run_dir: the run the plan was read from)
    checkpoint: str                   # relative to the run directory, e.g. checkpoints/last.pt
    checkpoint_sha256: str
    dataset_fingerprint: str          # of the data the checkpoint was trained on
    split: str                        # val | train
    blocks: list[str]                 # blocks dumped, in forward order
    deconv_blocks: list[str]
    paths: list[str]
    invert_blocks: list[str]
    invert_steps: int                 # at most; 0 = the inversion's default
    invert_target: float              # an inversion stops at this relative error (0: never)
    invert_solver: str                # lbfgs | adam
    prior: str
    fast: bool
    shards: list[list[int]]           # positions in the split, one list per array task
    n_images: int
    planned: str = ""                 # when it was made (TIME_FORMAT)
    topk: int = 0                     # images kept per channel for the dataset examples (0: none)
    featviz_blocks: list[str] = field(default_factory=list)  # blocks whose every channel is visualized (none:
    #                                   a plan from before feature visualization)
    featviz_steps: int = 0            # at most, per channel; 0 = featviz's default
    featviz_batch_size: int = 0       # channels optimised at once; 0 = from the memory there is
    extra: dict[str, Any] = field(default_factory=dict)  # room for later stages; never renamed
    exact: bool = False               # the inversion and featviz optimised in exact fp32 (False: bf16 on GPUs)

    def shard_attrs(self) -> dict[str, Any]:
        """The root attrs by which a shard says which plan it belongs to."""
        return {k: getattr(self, k) for k in SHARD_KEYS}

    def mismatch(self, attrs: dict[str, Any]) -> str | None:
        """Why a shard with root `attrs` is not this plan's, or None."""
        for k in SHARD_KEYS:
            mine, theirs = getattr(self, k), attrs.get(k, _BEFORE.get(k))
            if (list(mine) if isinstance(mine, list) else mine) != (list(theirs) if isinstance(theirs, (list, tuple))
                                                                     else theirs):
                what = {"checkpoint_sha256": "another checkpoint (another model)",
                        "dataset_fingerprint": "another data set"}.get(k, f"another {k}")
                return f"not this plan's: made from {what}: {k} {str(theirs)[:16]} != {str(mine)[:16]}"
        return None

    def same_request(self, other: Plan) -> bool:
        """Same images in the same shards, made the same way: its shards can be kept."""
        return self.shards == other.shards and self.shard_attrs() == other.shard_attrs()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["config"] = {**config_to_dict(self.config), "run_dir": ""}  # the plan belongs to its run
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], run_dir: str) -> Plan:
        values = dict(values)
        # a plan from before an option existed: its config has the value the plan was made with
        before = {k: values.get(k, copy.deepcopy(_BEFORE[k])) for k in _BEFORE}
        values["config"] = config_from_dict(VizConfig, {**before, **values["config"], "run_dir": run_dir})
        return cls(**values)
