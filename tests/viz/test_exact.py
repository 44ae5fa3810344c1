"""--exact: a plan and shard key, and what the inversion of an array task optimises with."""
import dataclasses

import torch

from hpcviz.config import VizConfig
from hpcviz.rundir import SHARD_KEYS, Plan
from hpcviz.viz import task


def plan(**kw):
    base = dict(config=VizConfig(), checkpoint="checkpoints/last.pt", checkpoint_sha256="0" * 64,
                dataset_fingerprint="f", split="val", blocks=["conv1"], deconv_blocks=[], paths=["both"],
                invert_blocks=["conv1"], invert_steps=5, invert_target=0.05, invert_solver="lbfgs", prior="tv",
                fast=False, shards=[[0, 1]], n_images=2)
    return Plan(**{**base, **kw})


def test_exact_is_a_shard_key_and_old_plans_were_not_exact():
    p = plan(exact=True, config=VizConfig(exact=True))
    assert "exact" in SHARD_KEYS and p.shard_attrs()["exact"] is True
    assert p.mismatch({**plan().shard_attrs()}) is not None  # a shard optimised with bf16 is not this plan's
    assert p.mismatch(p.shard_attrs()) is None
    old = p.to_dict()
    del old["exact"], old["config"]["exact"]  # a plan.json from before the option
    back = Plan.from_dict(old, "")
    assert back.exact is False and back.config.exact is False
    attrs = plan().shard_attrs()
    del attrs["exact"]  # a shard from before: made without --exact
    assert plan().mismatch(attrs) is None


def test_the_array_task_inverts_with_the_plans_precision(monkeypatch):
    seen = []

    def fake_invert(model, images, blocks, cfg, mean, std, progress, cache):
        seen.append((cfg.precision, cache))
        return {}
    monkeypatch.setattr(task, "invert", fake_invert)  # as the task module holds it
    state = {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    for exact in (False, True):
        task._write_inversions(None, None, torch.zeros(1, 3, 8, 8), plan(exact=exact), state, 0, cache="task cache")
    assert seen == [("auto", "task cache"), ("exact", "task cache")]
    assert {f.name for f in dataclasses.fields(VizConfig)} >= {"exact", "fast"}


def test_featviz_parts_optimise_with_the_plans_precision():
    from hpcviz.viz.featviz_parts import featviz_config
    assert featviz_config(plan()).precision == "auto"  # bf16 autocast on CUDA, exact fp32 on CPUs
    assert featviz_config(plan(exact=True, config=VizConfig(exact=True))).precision == "exact"
