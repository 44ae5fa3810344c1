"""Collation: the dataset examples' map in every shard, the exact merge into viz.h5 (unequal shards, a missing
one), the projections in viz/examples.h5, and the NXdata tags that let HDF5 viewers plot the files."""
import h5py
import numpy as np
import pytest
import torch

from hpcviz import store
from hpcviz.bench.examples import brute_force_topk
from hpcviz.config import VizConfig
from hpcviz.data.transforms import normalize
from hpcviz.explain.dataset_examples import receptive_field, selectivity
from hpcviz.models import from_checkpoint
from hpcviz.rundir import RunDir
from hpcviz.viz.collation import collate
from hpcviz.viz.plan import make_plan
from hpcviz.viz.task import run_shard


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A ResNet-20 trained briefly; 11 validation images in 3 shards of 4, 4 and 3, every block dumped, k = 5."""
    from hpcviz.config import TrainConfig
    from hpcviz.train.loop import train
    path = tmp_path_factory.mktemp("collation") / "run"
    train(TrainConfig(data="builtin:20", image_size=16, arch="resnet20", epochs=1, batch_size=32, lr=0.05,
                      device="cpu", run_dir=str(path), log_every=1000))
    plan = make_plan(VizConfig(run_dir=str(path), images=11, tasks=3, batch_size=3, topk=5, deconv_blocks=[],
                               invert_blocks=[], featviz_blocks=[]))
    RunDir(path).write_plan(plan)
    for k in range(3):
        run_shard(str(path), k)
    return path


def test_the_merge_equals_a_brute_force_top_k_over_viz_h5(run):
    r = RunDir(run)
    plan = r.read_plan()
    assert [len(s) for s in plan.shards] == [4, 4, 3]
    assert store.read_summaries(r.shard(2))["topk/layer3.2/value"].shape == (64, 3)  # 3 images < k
    summary = collate(r, plan)
    assert summary["n_images"] == 11 and not summary["missing"]
    data = store.read_shard(r.viz_file)
    assert "topk/conv1/value" in data and data["act/conv1"].shape[0] == 11
    for block in plan.blocks:
        ref = brute_force_topk(data[f"act/{block}"], data["index"], 5)
        for f in ("value", "index", "y", "x"):
            assert np.array_equal(data[f"topk/{block}/{f}"], ref[f]), (block, f)
        assert store.read_attrs(r.viz_file)["complete"] is True
    # class means and selectivity from the per-image activations, independently
    labels, act = data["label"], data["act/layer2.1"].astype(np.float64)
    for c in np.unique(labels):
        # from the float32 activations, where the stored ones are float16: equal to its rounding
        np.testing.assert_allclose(data["class_mean/layer2.1"][c], act[labels == c].mean(axis=(2, 3)).mean(0),
                                   rtol=2e-3, atol=1e-4)
    assert np.array_equal(data["class_count"], np.bincount(labels, minlength=10))
    sel, top = selectivity(data["class_mean/layer2.1"], data["class_count"])
    np.testing.assert_array_equal(data["selectivity/layer2.1"], sel)
    assert ((sel >= 0) & (sel <= 1)).all() and np.array_equal(data["selective_class/layer2.1"], top)


def test_a_missing_shard_makes_the_merge_say_it_is_incomplete(run, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    r = RunDir(copy)
    r.shard(1).unlink()
    summary = collate(r, r.read_plan())
    assert summary["n_images"] == 7 and list(summary["missing"]) == [1]
    with h5py.File(r.viz_file) as f:
        ds = f["topk/layer1.0/index"]
        assert ds.attrs["complete"] == False and ds.attrs["n_images"] == 7  # noqa: E712 (numpy bool)
        assert "INCOMPLETE" in ds.attrs["merged"]
        assert not set(ds[()].ravel()) & set(r.read_plan().shards[1])


def test_projections_show_each_channels_strongest_activation(run):
    r = RunDir(run)
    plan = r.read_plan()
    summary = collate(r, plan, project=True)
    parts = sorted(r.examples_dir.glob("part-*.h5"))
    assert summary["examples"] > 0 and len(parts) >= len(plan.blocks)  # at least one part per block
    stamps = [p.stat().st_mtime_ns for p in parts]
    collate(r, plan, project=True)  # the same lists and checkpoint: every part is reused
    assert [p.stat().st_mtime_ns for p in parts] == stamps
    data = store.read_shard(r.viz_file)  # the examples are presented in viz.h5 too, the parts concatenated
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    model = from_checkpoint(state)
    row = {int(p): i for i, p in enumerate(data["index"])}
    for block in ("conv1", "layer2.0", "layer3.2"):
        patch, deconv = data[f"examples/{block}/patch"], data[f"examples/{block}/deconv"]
        c = data[f"topk/{block}/index"].shape[0]
        size, stride, offset = receptive_field(model, block)
        p = min(size, 16)
        assert patch.shape == (c, 5, 3, p, p) and patch.dtype == np.uint8 and deconv.shape == patch.shape
        assert np.array_equal(data[f"examples/{block}/index"], data[f"topk/{block}/index"])
        assert np.array_equal(data[f"examples/{block}/channel"], np.arange(c))
        # the seed is the stored maximum (float16 rounding apart)
        np.testing.assert_allclose(data[f"examples/{block}/seed"], data[f"topk/{block}/value"], rtol=2e-3, atol=2e-3)
        ch, rank = c - 1, 2
        image = data["images"][row[int(data[f"topk/{block}/index"][ch, rank])]]
        y0, x0, y1, x1 = data[f"examples/{block}/box"][ch, rank]
        if size <= 16:  # the field fits: the patch is the image under it, the mean colour off the image
            inside = image[:, max(y0, 0):y1, max(x0, 0):x1]
            assert np.array_equal(patch[ch, rank][:, max(y0, 0) - y0:max(y0, 0) - y0 + inside.shape[1],
                                                  max(x0, 0) - x0:max(x0, 0) - x0 + inside.shape[2]], inside)
        else:
            assert np.array_equal(patch[ch, rank], image)
        # the projection is zero outside the field: take the full projection and compare its crop
        from hpcviz.explain.dataset_examples import crop, project
        from hpcviz.explain.deconv import Deconvnet
        x = normalize(torch.from_numpy(image[None]), state["mean"], state["std"])
        full, _ = project(Deconvnet(model), x, block, torch.tensor([ch]),
                          torch.tensor([int(data[f"topk/{block}/y"][ch, rank])]),
                          torch.tensor([int(data[f"topk/{block}/x"][ch, rank])]))
        ref = crop(full, np.array([[y0, x0, y1, x1]]))[0].numpy()
        np.testing.assert_allclose(deconv[ch, rank], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        if size <= 16:
            outside = full[0].abs().sum(0).numpy()
            outside[max(y0, 0):y1, max(x0, 0):x1] = 0
            assert outside.max() == 0
    grid = data["examples/layer1.0/grid"]
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3


def test_the_projection_array_task_computes_what_aggregation_would(run, tmp_path):
    """project_part (one task of the second array) merges the shards' lists itself: its part equals the one
    collation made, and collation then only presents it; a stale part is not presented without `project`."""
    import shutil

    from hpcviz.viz.projection import project_part
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    r = RunDir(copy)
    plan = r.read_plan()
    collate(r, plan, project=True)
    before = store.read_shard(r.examples_part(3))
    block = store.read_attrs(r.examples_part(3))["block"]
    r.examples_part(3).unlink()
    out = collate(r, plan)
    assert out["path"] is not None and block in out["examples_error"]
    shown = {n.split("/")[1] for n in store.list_datasets(r.viz_file) if n.startswith("examples/")}
    assert block not in shown and shown  # its block is left out, whole; the blocks whose parts are all current stay
    assert project_part(str(copy), 3) == str(r.examples_part(3))
    after = store.read_shard(r.examples_part(3))
    assert set(after) == set(before) and all(np.array_equal(after[n], before[n]) for n in before)
    stamp = r.examples_part(3).stat().st_mtime_ns
    assert project_part(str(copy), 3) == str(r.examples_part(3)) and r.examples_part(3).stat().st_mtime_ns == stamp
    assert project_part(str(copy), 999) == ""  # past the plan's parts: nothing to do
    collate(r, plan)  # every part current again: presented without projecting anything
    assert "examples/layer3.2/patch" in store.list_datasets(r.viz_file)


def test_viewers_find_a_default_image(run):
    """NXdata: root@default -> entry (NXentry) @default -> an NXdata group whose @signal is an image."""
    r = RunDir(run)
    collate(r, r.read_plan(), project=True)
    for path in (r.viz_file, r.shard(0), r.examples_part(0)):
        with h5py.File(path) as f:
            entry = f[f.attrs["default"]]
            assert entry.attrs["NX_class"] == "NXentry"
            nxdata = entry[entry.attrs["default"]]
            assert nxdata.attrs["NX_class"] == "NXdata"
            signal = nxdata[nxdata.attrs["signal"]]
            assert signal.attrs["interpretation"] in ("image", "rgb-image")
            assert len(nxdata.attrs["axes"]) == signal.ndim - (signal.attrs["interpretation"] == "rgb-image")
            assert isinstance(nxdata.get(nxdata.attrs["signal"], getlink=True), h5py.SoftLink)
    with h5py.File(r.viz_file) as f:
        assert f["entry/examples_layer3.2/data"].shape == f["examples/layer3.2/grid"].shape
        assert f["examples/layer3.2/grid"].shape[0] > 64 * 24  # every channel's row, over the parts
        assert f["entry/act_layer1.0/data"].shape[0] == 11
    # the soft links add no dataset names: the listing is what it was
    assert not [n for n in store.list_datasets(r.viz_file) if n.startswith("entry")]
    import shutil
    import subprocess
    if not shutil.which("h5ls") or not shutil.which("h5dump"):
        pytest.skip("h5ls/h5dump not on PATH (apt-get install -y hdf5-tools)")
    for path in (r.viz_file, r.examples_part(0)):  # HDF5's own tools read every file, links included
        out = subprocess.run(["h5ls", "-r", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Soft Link {/" in out.stdout, out.stderr
        out = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and 'ATTRIBUTE "NX_class"' in out.stdout and "SOFTLINK" in out.stdout, out.stderr


def test_inspect_prints_a_channels_top_k_and_draws_it(run, tmp_path, capsys):
    """jobs/inspect_results.py RUN --block B --channel C (in process): the table matches viz.h5; --png draws
    the patches and projections; a bad block or channel is one error line, exit 2."""
    from hpcviz.commands import inspect as cli
    r = RunDir(run)
    collate(r, r.read_plan(), project=True)
    parser = cli.get_args_parser(add_help=True)
    png = tmp_path / "ch.png"
    assert cli.main(parser.parse_args([str(run), "--block", "layer2.1", "--channel", "7", "--png", str(png)])) == 0
    out = capsys.readouterr().out
    data = store.read_shard(r.viz_file, ["topk/layer2.1/index", "topk/layer2.1/value", "index", "label"])
    classes = store.read_attrs(r.viz_file)["class_names"]
    first = int(data["topk/layer2.1/index"][7, 0])
    label = classes[int(data["label"][list(data["index"]).index(first)])]
    assert "layer2.1 channel 7: its top 5 of 11 images" in out and "class selectivity" in out
    row = next(line for line in out.splitlines() if line.split("│")[1:2] and line.split("│")[1].strip() == "0")
    cells = [c.strip() for c in row.split("│")]
    assert cells[2] == f"{float(data['topk/layer2.1/value'][7, 0]):.4g}" and cells[3] == str(first)
    assert cells[4] == label
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in out
    for bad, match in ((["--block", "layer9.9", "--channel", "0"], "--block 'layer9.9': not a block with dataset "
                        "examples or feature visualizations; valid: conv1, "), (["--block", "conv1", "--channel", "16"], "--channel 16: conv1 "
                        "has channels 0..15"), (["--block", "conv1"], "--block and --channel go together")):
        assert cli.main(parser.parse_args([str(run), *bad])) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {match}") and err.count("\n") == 1, err


def test_a_changed_checkpoint_stops_the_projections_not_the_collation(run, tmp_path):
    """Weights that changed after the plan (training resumed): the shards' lists are the old model's, so the
    projection refuses them; collation still presents the shards and the merge, and says why."""
    import shutil

    from hpcviz.train import checkpoint
    from hpcviz.viz.plan import VizError
    from hpcviz.viz.projection import project_part
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    r = RunDir(copy)
    shutil.rmtree(r.examples_dir, ignore_errors=True)
    state = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    checkpoint.save_checkpoint(state, r.checkpoints)
    summary = collate(r, r.read_plan(), project=True)
    assert summary["path"] == r.viz_file and summary["n_images"] == 11
    assert "changed since the plan was made" in summary["examples_error"]
    names = store.list_datasets(r.viz_file)
    assert "topk/conv1/index" in names and not [n for n in names if n.startswith("examples/")]
    with pytest.raises(VizError, match="changed since the plan was made"):
        project_part(str(copy), 0)


def test_a_plan_from_before_the_dataset_examples_keeps_its_meaning(run):
    """plan.json written before --topk existed: no examples, in the plan and in its request (so a retry
    repeats the same request instead of meeting 'another request')."""
    import json

    from hpcviz.rundir import Plan
    values = json.loads((run / "viz" / "plan.json").read_text())
    values.pop("topk")
    values["config"].pop("topk")
    values["config"].pop("example_size")
    old = Plan.from_dict(values, str(run))
    assert old.topk == 0 and old.config.topk == 0
    assert old.mismatch({k: v for k, v in old.shard_attrs().items() if k != "topk"}) is None  # an old shard


def test_current_parts_are_collated_in_one_write_and_a_bad_part_takes_nothing(run, tmp_path, monkeypatch):
    """Nothing to compute: the parts are judged against the shards' merged lists and viz.h5 is written once, the
    same file as the two writes of a collation that projects (the view, then with the parts), without reading the
    checkpoint (the shards say the architecture: the parts' plan needs it). A part that
    cannot be presented (not an HDF5 file, though its digest was read before) leaves viz.h5 as the shards make it,
    and says why."""
    import shutil

    import hpcviz.viz.collation as collation
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    r = RunDir(copy)
    plan = r.read_plan()
    collate(r, plan, project=True)
    with_parts = {n: store.read_shard(r.viz_file, [n])[n] for n in store.list_datasets(r.viz_file)}
    r.viz_file.unlink()
    writes = []
    real = store.write_view
    monkeypatch.setattr(collation.store, "write_view", lambda *a, **k: writes.append(k["attach"]) or real(*a, **k))
    out = collate(r, plan)
    assert len(writes) == 1 and len(writes[0]) == len(list(r.examples_dir.glob("part-*.h5")))
    assert "examples_error" not in out and out["path"] == r.viz_file
    once = {n: store.read_shard(r.viz_file, [n])[n] for n in store.list_datasets(r.viz_file)}
    assert set(once) == set(with_parts) and all(np.array_equal(once[n], with_parts[n]) for n in once)

    shutil.rmtree(r.path / "checkpoints")  # the architecture comes from the shards, not the weights
    r.viz_file.unlink()
    writes.clear()
    out = collate(r, plan)
    assert len(writes) == 1 and "examples_error" not in out and out["n_images"] == 11
    assert "examples/layer3.2/patch" in store.list_datasets(r.viz_file)

    writes.clear()
    monkeypatch.setattr(collation, "_current", lambda *a: {"examples": [r.examples_part(0), tmp_path / "x.h5"]})
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    out = collate(r, plan)
    assert len(writes) == 2 and writes[1] == [] and "could not be presented" in out["examples_error"]
    assert out["path"] == r.viz_file and out["n_images"] == 11
    assert not [n for n in store.list_datasets(r.viz_file) if n.startswith("examples/")]
