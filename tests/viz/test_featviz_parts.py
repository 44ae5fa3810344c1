"""Feature visualization in the array: the parts (cost-weighted, whole blocks or one block's range), the part
task (digest, skipped when current, stale after a config change, another run's refused), viz.h5's datasets
(names, shapes, NXdata tags, the config in the attrs) and the stored value recomputed from the stored image."""
import dataclasses
import shutil

import h5py
import numpy as np
import pytest
import torch

from hpcviz import store
from hpcviz.config import TrainConfig, VizConfig
from hpcviz.rundir import RunDir
from hpcviz.train.loop import train
from hpcviz.viz import featviz_parts as fp
from hpcviz.viz.collation import collate
from hpcviz.viz.plan import make_plan
from hpcviz.viz.state import StageFailed, check_outcome, run_state
from hpcviz.viz.task import run_shard


def test_parts_cover_every_channel_once_by_cost():
    channels = {"conv1": 16, "layer1.0": 16, "layer1.1": 16, "layer2.0": 32, "layer3.0": 64, "layer3.1": 64}
    cost = {b: i + 1 for i, b in enumerate(channels)}  # per channel: a row runs through i + 1 blocks
    for parts in (1, 2, 3, 5, 8, 40, 1000):
        got = fp.split_featviz(channels, parts)
        flat = [(b, c) for part in got for b, lo, hi in part for c in range(lo, hi)]
        assert flat == [(b, c) for b, n in channels.items() for c in range(n)], parts  # each once, in order
        for part in got:  # whole blocks, or a range of one block: a block's parts never hold another's range
            assert len(part) == 1 or all(hi - lo == channels[b] for b, lo, hi in part), (parts, part)
        loads = [sum((hi - lo) * cost[b] for b, lo, hi in part) for part in got]
        share = sum(n * cost[b] for b, n in channels.items()) / parts
        assert max(loads) <= max(1.5 * share, len(channels)), (parts, loads)  # one deep channel costs 6
        assert min(parts, 208) // 2 <= len(got) <= parts + 2, (parts, len(got))
    assert fp.split_featviz(channels, 1) == [tuple((b, 0, n) for b, n in channels.items())]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two of a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A ResNet-20 trained briefly (16 px): 6 images in 2 shards (no dataset examples), the feature
    visualization of three blocks in 4 steps."""
    path = tmp_path_factory.mktemp("featviz") / "run"
    torch.manual_seed(0)
    train(TrainConfig(data="builtin:20", image_size=16, arch="resnet20", epochs=1, batch_size=32, lr=0.05,
                      device="cpu", run_dir=str(path), log_every=1000))
    plan = make_plan(VizConfig(run_dir=str(path), images=6, tasks=2, topk=0, deconv_blocks=[], invert_blocks=[],
                               featviz_blocks=["conv1", "layer1.0", "layer3.2"], featviz_steps=4))
    RunDir(path).write_plan(plan)
    for k in range(2):
        run_shard(str(path), k)
    return path


@pytest.mark.slow
def test_parts_digest_staleness_and_viz_h5(run):
    r = RunDir(run)
    plan = r.read_plan()
    parts = fp.plan_featviz_parts(r, plan)
    assert plan.featviz_blocks == ["conv1", "layer1.0", "layer3.2"] and len(parts) >= 2
    assert [i for i, state, _ in fp.featviz_states(r, plan)] == list(range(len(parts)))
    assert {state for _, state, _ in fp.featviz_states(r, plan)} == {"missing"}
    assert [i.name for i in run_state(r).items if i.name.startswith("featviz[")] == \
        [f"featviz[{i}]" for i in range(len(parts))]
    for i in range(len(parts)):
        assert fp.featviz_part(str(run), i) == str(r.featviz_part(i))
    assert fp.featviz_part(str(run), len(parts)) == ""  # the array may be sized larger than the plan
    assert fp.stale_featviz(r, plan) == []
    stamps = [r.featviz_part(i).stat().st_mtime_ns for i in range(len(parts))]
    fp.featviz_part(str(run), 0)  # current: skipped
    assert r.featviz_part(0).stat().st_mtime_ns == stamps[0]
    attrs = store.read_attrs(r.featviz_part(0))
    assert attrs["format"] == fp.PART_FORMAT and attrs["checkpoint_sha256"] == plan.checkpoint_sha256
    assert attrs["config"]["steps"] == 4 and attrs["segments"] == [list(s) for s in parts[0]]
    # another featviz config makes every part stale; the plan's own config is current again
    other = dataclasses.replace(plan, featviz_steps=5)
    assert fp.stale_featviz(r, other) == list(range(len(parts)))
    summary = collate(r, plan)
    assert "featviz_error" not in summary
    data = store.read_shard(r.viz_file)
    model_blocks = {"conv1": 16, "layer1.0": 16, "layer3.2": 64}
    for b, c in model_blocks.items():
        assert data[f"featviz/{b}"].shape == (c, 3, 16, 16) and data[f"featviz/{b}"].dtype == np.float32
        assert data[f"featviz_value/{b}"].shape == (c,) and data[f"featviz_steps/{b}"].shape == (c,)
        assert ((data[f"featviz_steps/{b}"] >= 1) & (data[f"featviz_steps/{b}"] <= 4)).all()
    assert not any(n.startswith("featviz/layer2") for n in data)
    with h5py.File(r.viz_file) as f:  # the viewers' tags, the axes' names, the config that made them
        group = f["entry/featviz_layer3.2"]
        assert group.attrs["NX_class"] == "NXdata" and group.attrs["signal"] == "data"
        assert group.get("data", getlink=True).path == "/featviz/layer3.2"
        ds = f["featviz/layer3.2"]
        assert [d.label for d in ds.dims] == ["channel", "rgb", "y", "x"]
    meta = store.describe(r.viz_file)
    attrs = next(o["attrs"] for o in meta["objects"] if o["name"] == "featviz/layer3.2")
    assert attrs["seed"] == 0 and attrs["max_steps"] == 4 and len(attrs["priors"]) >= 3


def inspect(capsys, *args):
    from hpcviz.commands import inspect as command
    code = command.main(command.get_args_parser().parse_args([str(a) for a in args]))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_shows_a_channels_feature_visualization(run, tmp_path, capsys):
    r = RunDir(run)
    plan = r.read_plan()
    for i in range(len(fp.plan_featviz_parts(r, plan))):
        fp.featviz_part(str(run), i)
    collate(r, plan)
    data = store.read_shard(r.viz_file, ["featviz_value/layer3.2", "featviz_steps/layer3.2"])
    code, out, err = inspect(capsys, run, "--block", "layer3.2", "--channel", 5, "--png", tmp_path / "c.png")
    assert code == 0, err
    value, steps = float(data["featviz_value/layer3.2"][5]), int(data["featviz_steps/layer3.2"][5])
    assert f"feature visualization: mean activation {value:.4g} after {steps} steps (at most 4)" in out, out
    from PIL import Image
    with Image.open(tmp_path / "c.png") as im:  # the feature visualization, enlarged
        assert im.size[0] >= 16 and im.size[0] % 16 == 0
    code, out, err = inspect(capsys, run, "--block", "layer2.0", "--channel", 0)
    assert code == 2 and "not a block with dataset examples or feature visualizations" in err
    code, out, err = inspect(capsys, run, "--block", "layer3.2", "--channel", 64)
    assert code == 2 and "layer3.2 has channels 0..63" in err


def test_the_stored_value_is_the_stored_images_activation(run):
    """/featviz_value/<block> recomputed from /featviz/<block> by the model's own forward (a hook on the block)."""
    r = RunDir(run)
    if not r.viz_file.is_file() or "featviz/layer1.0" not in store.list_datasets(r.viz_file):
        for i in range(len(fp.plan_featviz_parts(r, r.read_plan()))):
            fp.featviz_part(str(run), i)
        collate(r, r.read_plan())
    from hpcviz.models import from_checkpoint
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    model = from_checkpoint(state).eval()
    for block in ("conv1", "layer1.0", "layer3.2"):
        data = store.read_shard(r.viz_file, [f"featviz/{block}", f"featviz_value/{block}"])
        x = torch.from_numpy(data[f"featviz/{block}"])
        got = {}
        module = model.relu if block == "conv1" else model.get_submodule(block)
        hook = module.register_forward_hook(lambda m, i, o, got=got: got.setdefault("a", o.detach().clone()))
        try:
            with torch.no_grad():
                model(x)
        finally:
            hook.remove()
        a = got["a"]  # (C, C, h, w): image c's activation of channel c
        ref = a[torch.arange(len(a)), torch.arange(len(a))].mean((-2, -1)).numpy()
        np.testing.assert_allclose(data[f"featviz_value/{block}"], ref, rtol=1e-4, atol=1e-5)
        pixels = x * torch.tensor(state["std"]).view(1, 3, 1, 1) + torch.tensor(state["mean"]).view(1, 3, 1, 1)
        assert pixels.min() >= 0 and pixels.max() <= 1  # a valid image of the input space


def test_another_runs_part_is_refused_and_the_state_says_what_to_do(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    r = RunDir(copy)
    plan = r.read_plan()
    parts = fp.plan_featviz_parts(r, plan)
    for i in range(len(parts)):
        fp.featviz_part(str(copy), i)
    # part 0 as another run made it (another checkpoint: its digest is that run's)
    state = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    foreign = dataclasses.replace(plan, checkpoint_sha256="0" * 64)
    fp.compute_part(r, foreign, state, 0, parts[0], "cpu")
    states = fp.featviz_states(r, plan)
    assert states[0][1] == "stale" and all(s == "done" for _, s, _ in states[1:])
    summary = collate(r, plan)  # not presented: its blocks are left out of viz.h5, named
    gone = {b for b, _, _ in parts[0]}
    assert all(b in summary["featviz_error"] for b in gone)
    names = store.list_datasets(r.viz_file)
    assert not any(f"featviz/{b}" in names for b in gone) and any(n.startswith("featviz/") for n in names)
    with pytest.raises(StageFailed, match=r"featviz\[0\] stale.*hint: python jobs/aggregate.py"):
        check_outcome(r, ("viz",))
    from hpcviz.report.inspection import channel_examples, check_examples, featviz_problem, run_of
    b, lo, _ = parts[0][0]
    assert "is not this run's feature visualization part" in featviz_problem(r, b, lo, presented=True)
    with pytest.raises(Exception, match="its feature visualization is not shown: .*is not this run's"):
        channel_examples(r.viz_file, b, lo, run_of(r.viz_file))  # not presented: a block that is not there
    with pytest.raises(Exception, match="is not this run's feature visualization part"):
        check_examples(r.viz_file, f"featviz/{b}", lo)
    r.featviz_part(1).unlink()
    assert [s for _, s, _ in fp.featviz_states(r, plan)][:2] == ["stale", "missing"]
    summary = collate(r, plan, featviz=True)  # the aggregation computes what is missing or stale
    assert "featviz_error" not in summary and fp.stale_featviz(r, plan) == []
    assert all(f"featviz/{b}" in store.list_datasets(r.viz_file) for b in plan.featviz_blocks)
