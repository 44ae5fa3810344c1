import logging
import re

import numpy as np
import pytest
import torch

from hpcviz import store
from hpcviz.config import AggregateConfig, VizConfig
from hpcviz.data.transforms import normalize
from hpcviz.errors import InputError
from hpcviz.explain.activations import dump_activations
from hpcviz.launch.executors import submit_array
from hpcviz.log import LOGGER
from hpcviz.models import from_checkpoint
from hpcviz.report.aggregate import aggregate
from hpcviz.rundir import RunDir
from hpcviz.viz import task
from hpcviz.viz.plan import VizError, balanced_sample, load_split, make_plan, plan_shards, shard_problem
from hpcviz.viz.task import run_shard

from conftest import train_tiny


def shard_path(run, k):
    return RunDir(run).shard(k)


def shard_done(run, k, plan):
    return shard_problem(RunDir(run), k, plan) is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("vizrun") / "run")


def test_balanced_sample_and_plan():
    labels = np.repeat(np.arange(4), [10, 3, 10, 10])
    s = balanced_sample(labels, 10, seed=1)
    assert len(s) == 10 and len(set(s)) == 10 and list(s) == sorted(s)
    counts = np.bincount(labels[s], minlength=4)
    assert counts.max() - counts.min() <= 1
    assert np.array_equal(s, balanced_sample(labels, 10, seed=1))
    assert not np.array_equal(s, balanced_sample(labels, 10, seed=2))
    shards = plan_shards(list(range(10)), 3)
    assert [len(x) for x in shards] == [4, 3, 3] and sum(shards, []) == list(range(10))
    assert plan_shards([5, 6], 8) == [[5], [6]]  # never an empty shard


def write_run_plan(run, **kw):
    kw.setdefault("invert_steps", 15)  # a few steps: the wiring is tested here, the quality in test_inversion
    kw.setdefault("featviz_blocks", [])  # tested in test_featviz_parts
    cfg = VizConfig(run_dir=str(run), images=12, tasks=2, batch_size=5, **kw)
    plan = make_plan(cfg)
    RunDir(run).write_plan(plan)
    return plan


def test_shard_holds_what_the_network_computes(trained, caplog):
    plan = write_run_plan(trained)
    logging.getLogger(LOGGER).addHandler(caplog.handler)  # run_shard sets up its own handlers: these stay
    try:
        path = run_shard(str(trained), 1)
    finally:
        logging.getLogger(LOGGER).removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(r"shard 1: inversion of images 0-5 of 6: step \d+ of at most 15, \d+ of 24 inversions "
                            r"still running; .* ETA .*", line) for line in lines), lines
    assert re.fullmatch(r"shard 1 done: 6 images in [\d.]+ s \(load [\d.]+, forward [\d.]+, topk [\d.]+, "
                        r"deconv [\d.]+, inversion [\d.]+, write [\d.]+ s\) -> .*shard-00001.h5", lines[-1]), lines[-1]
    data = store.read_shard(path)
    attrs = store.verify_shard(path, 6)
    assert attrs["arch"] == "resnet20" and attrs["shard"] == 1 and len(attrs["class_names"]) == 10
    # independent reference: rebuild the model and run the same pixels forward in one batch
    state = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    model = from_checkpoint(state)
    images, labels, _ = load_split(state["config"], "val")
    pos = plan.shards[1]
    assert np.array_equal(data["index"], pos)
    assert np.array_equal(data["images"], images[pos].numpy()) and np.array_equal(data["label"], labels[pos].numpy())
    logits, acts = dump_activations(model, normalize(images[pos], state["mean"], state["std"]))
    np.testing.assert_allclose(data["logits"], logits.numpy(), rtol=1e-4, atol=1e-4)
    assert np.array_equal(data["pred"], logits.argmax(1).numpy())
    for block, a in acts.items():
        assert data[f"act/{block}"].dtype == np.float16
        np.testing.assert_allclose(data[f"act/{block}"].astype(np.float32), a.numpy(), rtol=2e-3, atol=2e-3)
    # deconvnet reconstructions: every block x path, raw float32, equal to an autograd (Captum-style) reference
    from hpcviz.bench.viz import captum_style_deconv
    x = normalize(images[pos], state["mean"], state["std"])
    assert {n for n in data if n.startswith("deconv/")} == {f"deconv/{b}/{p}" for b in acts
                                                             for p in ("both", "residual", "shortcut")}
    for block, path in (("layer2.0", "residual"), ("layer3.2", "shortcut"), ("layer1.1", "both")):
        ref = captum_style_deconv(model, x, block, path).numpy()
        got = data[f"deconv/{block}/{path}"]
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # inversions: conv1 and each stage's last block by default; the stored error is what the stored image gives
    assert sorted(n for n in data if n.startswith("invert/")) == ["invert/conv1", "invert/layer1.2",
                                                                 "invert/layer2.2", "invert/layer3.2"]
    _, inv_acts = dump_activations(model, torch.from_numpy(data["invert/layer2.2"]), ["layer2.2"])
    phi, phi0 = inv_acts["layer2.2"].flatten(1), acts["layer2.2"].flatten(1)
    expected = ((phi - phi0).norm(dim=1) / phi0.norm(dim=1)).numpy()
    np.testing.assert_allclose(data["invert_error/layer2.2"], expected, rtol=1e-3, atol=1e-5)
    for block in ("conv1", "layer1.2", "layer2.2", "layer3.2"):  # every block: error and steps agree with the rule
        _, a = dump_activations(model, torch.from_numpy(data[f"invert/{block}"]), [block])
        err = ((a[block] - acts[block]).flatten(1).norm(dim=1) / acts[block].flatten(1).norm(dim=1)).numpy()
        np.testing.assert_allclose(data[f"invert_error/{block}"], err, rtol=1e-3, atol=1e-5)
        steps = data[f"invert_steps/{block}"]
        assert steps.dtype == np.int32 and ((steps >= 5) & (steps <= 15)).all()  # checked every 5 steps
        assert ((err <= 0.05 + 1e-5) | (steps == 15)).all()  # short of the target: it ran every step
        assert (steps[err > 0.05 + 1e-5] == 15).all() and ((steps == 15) | (err <= 0.05 + 1e-5)).all()


def test_rerun_skips_done_shards_and_redoes_a_killed_one(trained, monkeypatch):
    plan = write_run_plan(trained, blocks=["layer2.0"])
    first = run_shard(str(trained), 0)  # a shard of the earlier plan (every block) is not taken for this one
    assert list(store.verify_shard(first)["blocks"]) == ["layer2.0"]
    mtime = shard_path(trained, 0).stat().st_mtime_ns
    assert run_shard(str(trained), 0) == first and shard_path(trained, 0).stat().st_mtime_ns == mtime  # skipped

    # a task killed mid-shard: the writer raises half way; nothing is accepted at the shard path
    calls = {"n": 0}
    real = task.dump_activations

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    monkeypatch.setattr(task, "dump_activations", dies)
    with pytest.raises(KeyboardInterrupt):
        run_shard(str(trained), 1)
    assert not shard_done(trained, 1, plan)  # the old shard-00001 (other blocks) or nothing
    assert not list((trained / "viz" / "shards").glob("*.tmp-*"))  # the killed writer's temp is gone
    monkeypatch.undo()
    run_shard(str(trained), 1)
    assert shard_done(trained, 1, plan)
    assert shard_path(trained, 0).stat().st_mtime_ns == mtime  # the good shard was not touched
    summary = store.write_view([shard_path(trained, s) for s in (0, 1)], trained / "viz" / "viz.h5")
    assert summary["n_images"] == 12 and not summary["missing"]


def test_figures_from_the_array_outputs(trained):
    """The array's outputs drawn once, by the report (one figure path): filters, maps, deconvnet, inversions."""
    write_run_plan(trained, blocks=["conv1", "layer3.2"], deconv_blocks=["layer3.2"], paths=["both", "shortcut"])
    for s in (0, 1):
        run_shard(str(trained), s)
    aggregate(AggregateConfig(run_dir=str(trained), images=1, invert_images=2, projections=False))
    saved = sorted((trained / "report" / "figures").glob("*.png"))
    names = [p.name for p in saved]
    assert "conv1_filters.png" in names and "feature_maps_0.png" in names and "deconv_0.png" in names
    assert "inversions.png" in names and not (trained / "viz" / "figures").exists()
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in saved)


def test_bad_requests(trained):
    with pytest.raises(VizError, match="--split 'test'"):
        make_plan(VizConfig(run_dir=str(trained), split="test"))
    with pytest.raises(VizError, match="--indices \\[999\\]"):
        make_plan(VizConfig(run_dir=str(trained), indices=[999]))
    with pytest.raises(InputError, match="--blocks layer9.9"):
        make_plan(VizConfig(run_dir=str(trained), blocks=["layer9.9"]))
    with pytest.raises(InputError, match="--invert-blocks layr3.2: not blocks of this model"):
        make_plan(VizConfig(run_dir=str(trained), invert_blocks=["layr3.2"]))  # named by its own option
    with pytest.raises(InputError, match="--deconv-blocks layer0.0"):
        make_plan(VizConfig(run_dir=str(trained), deconv_blocks=["layer0.0"]))
    with pytest.raises(InputError, match="--paths sideways: valid paths are both, residual, shortcut"):
        make_plan(VizConfig(run_dir=str(trained), paths=["sideways"]))
    with pytest.raises(InputError, match="--prior 'l2': not one of tv, none"):
        make_plan(VizConfig(run_dir=str(trained), prior="l2"))


class FakeExecutor:
    def __init__(self):
        self.calls = []

    def update_parameters(self, **kw):
        self.params = kw

    def map_array(self, fn, runs, items):
        self.calls.append(list(items))
        return [f"job{len(self.calls)}_{i}" for i in range(len(items))]


def test_arrays_respect_max_array_size(monkeypatch):
    import hpcviz.launch.executors as launch
    monkeypatch.setattr(launch, "max_array_size", lambda: 3)
    ex = FakeExecutor()
    jobs = submit_array(ex, print, "run", list(range(7)), "slurm", throttle=2)
    assert ex.calls == [[0, 1, 2], [3, 4, 5], [6]] and len(jobs) == 7  # offsets into the shard list
    assert ex.params == {"slurm_array_parallelism": 2}


def test_the_plan_records_the_task_size_it_used(trained):
    """GPU tasks hold more images by default; the plan keeps the resolved --per-task, so the training job of the
    pipeline or a retry, planning the same request again, splits the images the same way."""
    import dataclasses
    cpu, gpu = (make_plan(VizConfig(run_dir=str(trained), images=12), gpu=g) for g in (False, True))
    assert cpu.config.per_task == 100 and len(cpu.shards) == 1
    assert gpu.config.per_task == 1024 * 32 ** 2 // 16 ** 2 and len(gpu.shards) == 1  # the run's images: 16 px
    few = make_plan(VizConfig(run_dir=str(trained), images=12, per_task=5), gpu=True)
    assert few.config.per_task == 5 and [len(s) for s in few.shards] == [4, 4, 4]
    again = make_plan(dataclasses.replace(few.config, run_dir=str(trained)))  # as a retry plans it, on a CPU
    assert again.shards == few.shards and again.same_request(few)
