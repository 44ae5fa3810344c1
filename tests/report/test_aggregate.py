"""The aggregation stage on a tiny trained run: every figure and table, missing shards named, hostile
class names escaped, a failed training still reported."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from hpcviz import store
from hpcviz.commands import aggregate as job
from hpcviz.config import VizConfig
from hpcviz.report.aggregate import AggregateConfig, AggregateError, aggregate
from hpcviz.rundir import RunDir
from hpcviz.viz.plan import make_plan
from hpcviz.viz.task import run_shard

from conftest import check_links

HOSTILE = ["<script>alert(1)", "cat & dog", "$\\foo$ math"]  # the last would crash matplotlib's mathtext
FIGURES = {"training_curves", "class_accuracy", "confusion_matrix", "conv1_filters", "feature_maps_0",
           "feature_maps_1", "deconv_0", "deconv_1", "inversions"}
TABLES = {"accuracy", "per_class_accuracy", "inversion_error", "training_parameters", "class_selectivity", "featviz"}
BLOCKS = ["conv1"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]  # ResNet-20's
EXAMPLES = {f"examples_{b}{full}" for b in BLOCKS for full in ("", "_all")}  # each block's selective and full grid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """ResNet-20 trained for one epoch on an image folder whose class names are hostile HTML, with its
    visualization shards (2 shards of 3 images)."""
    from hpcviz.config import TrainConfig
    from hpcviz.train.loop import train
    root = tmp_path_factory.mktemp("agg")
    rng = np.random.default_rng(0)
    for k, name in enumerate(HOSTILE):
        (root / "data" / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 60, (16, 16, 3)) + np.array([0, 90, 180])[[k, (k + 1) % 3, (k + 2) % 3]]
            Image.fromarray(pixels.astype(np.uint8)).save(root / "data" / name / f"{i:02d}.png")
    run = root / "run"
    train(TrainConfig(data=str(root / "data"), image_size=16, arch="resnet20", epochs=1, batch_size=8, lr=0.05,
                      val_fraction=0.25, device="cpu", run_dir=str(run), log_every=1000))
    plan = make_plan(VizConfig(run_dir=str(run), images=6, tasks=2, batch_size=4, invert_steps=10,
                               topk=3, featviz_steps=2))  # 3 examples per channel: their projections are the slow part
    RunDir(run).write_plan(plan)
    for s in range(2):
        run_shard(str(run), s)
    return run


@pytest.mark.slow
def test_report_has_every_figure_and_table(run):
    summary = aggregate(AggregateConfig(run_dir=str(run), images=2))
    out = run / "report"
    assert {p.stem for p in (out / "figures").glob("*.png")} == FIGURES | EXAMPLES
    assert {p.name for p in (out / "tables").iterdir()} == {f"{t}.{e}" for t in TABLES for e in ("csv", "md")}
    assert summary["missing_shards"] == [] and summary["n_images"] == 6
    ev = json.loads((run / "eval.json").read_text())
    rows = list(csv.DictReader(open(out / "tables" / "per_class_accuracy.csv")))
    assert [r["class"] for r in rows] == ev["classes"] == sorted(HOSTILE)
    for r in rows:  # the table agrees with eval.json's confusion matrix
        acc = ev["per_class_accuracy"][r["class"]]
        assert float(r["accuracy (%)"]) == pytest.approx(100 * acc, abs=0.006)
    errors = store.read_shard(run / "viz" / "viz.h5", ["invert_error/conv1"])["invert_error/conv1"]
    inv = {r["block"]: r for r in csv.DictReader(open(out / "tables" / "inversion_error.csv"))}
    assert float(inv["conv1"]["median"]) == pytest.approx(float(np.median(errors)), abs=1e-4)
    md = (out / "report.md").read_text()
    for section in ("1. Training", "2. Accuracy", "3. First-layer filters", "4. Feature maps",
                    "5. Deconvnet reconstructions", "6. Inversions", "7. What the channels respond to", "8. Pipeline",
                    "Appendix: configuration"):
        assert f"## {section}" in md
    # dataset examples: each block's most selective channels embedded, its full grid linked, a table of them
    blocks = list(store.read_attrs(run / "viz" / "viz.h5")["blocks"])
    html = (out / "report.html").read_text()
    for block in blocks:
        assert f"figures/examples_{block}.png" in md and (out / "figures" / f"examples_{block}_all.png").is_file()
        assert f'<a href="figures/examples_{block}_all.png">' in html and f"examples_{block}_all.png)" in md
    sel = list(csv.DictReader(open(out / "tables" / "class_selectivity.csv")))
    assert len(sel) == 4 * len(blocks) and all(0 <= float(r["selectivity"]) <= 1 for r in sel)
    merged = store.read_shard(run / "viz" / "viz.h5", [f"selectivity/{blocks[-1]}"])[f"selectivity/{blocks[-1]}"]
    shown = [float(r["selectivity"]) for r in sel if r["block"] == blocks[-1]]
    assert shown == pytest.approx(sorted(merged, reverse=True)[:4], abs=1e-3)  # the most selective, in order
    assert "<script" not in html
    assert all(f"figures/{f}.png" in md for f in FIGURES) and "Warning" not in md
    with Image.open(out / "figures" / "conv1_filters.png") as im:  # every PNG records its config
        meta = json.loads(im.info["Description"])
    assert meta["config"]["train"]["arch"] == "resnet20" and meta["config"]["aggregate"]["images"] == 2
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["aggregate"]["status"] == "done" and manifest["viz"]["status"] == "done"
    # the atlas: a page per block, linked from the report, every link and anchor resolving
    assert json.loads((out / "report.json").read_text())["atlas"] == "atlas/index.html"
    assert "(atlas/index.html)" in md and '<a href="atlas/index.html">' in html
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {f"atlas/{b}.html" for b in BLOCKS} < set(files) and check_links(files, exempt=(), under="atlas/") > 3 * 352
    page = files["atlas/layer3.2.html"].decode()
    assert page.count('class="card"') == 64 and "&lt;script&gt;alert(1)" in page and "<script" not in page
    assert len([f for f in files if f.startswith("atlas/img/layer3.2/fv-")]) == 64


@pytest.mark.slow
def test_html_is_self_contained_and_escapes_class_names(run):
    aggregate(AggregateConfig(run_dir=str(run)))
    page = (run / "report" / "report.html").read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)" in page and "cat &amp; dog" in page
    # the default shows 3 images: one more feature-map and deconvnet figure than above, and none left over
    # the full grids are linked, never embedded
    assert page.count('src="data:image/png;base64,') == len(FIGURES) + 2 + len(BLOCKS)
    assert {p.stem for p in (run / "report" / "figures").glob("*.png")} == FIGURES | EXAMPLES | {"feature_maps_2",
                                                                                              "deconv_2"}
    aggregate(AggregateConfig(run_dir=str(run), images=1))
    assert not (run / "report" / "figures" / "deconv_1.png").exists()  # stale figures are removed
    md = (run / "report" / "report.md").read_text().split("```")[0]
    assert "<script" not in md and "&lt;script&gt;alert(1)" in md


@pytest.mark.slow
def test_missing_shard_is_named_and_rerun_fills_it(run, capsys):
    shard = RunDir(run).shard(1)
    before = store.read_shard(run / "viz" / "viz.h5")
    shard.unlink()
    assert job.main(job.get_args_parser().parse_args(["--run", str(run)])) == 1
    err = capsys.readouterr().err
    assert "error: the report lacks 1 shard(s): shard-00001.h5" in err and "--retry-failed" in err
    md = (run / "report" / "report.md").read_text()
    assert "1 of 2 visualization shards missing" in md and "shard-00001.h5: no such file" in md
    assert "--retry-failed" in md
    assert store.read_attrs(run / "viz" / "viz.h5")["n_images"] == 3  # the rest is still reported
    assert json.loads((run / "report" / "report.json").read_text())["missing_shards"] == ["shard-00001.h5"]
    run_shard(str(run), 1)
    assert job.main(job.get_args_parser().parse_args(["--run", str(run)])) == 0
    after = store.read_shard(run / "viz" / "viz.h5")
    assert set(after) == set(before) and all(np.array_equal(after[k], before[k], equal_nan=True) for k in before)


def test_failed_training_still_gets_a_report(tmp_path):
    run = tmp_path / "failed"
    RunDir(run).update("train", status="failed")
    RunDir(run).write_config("train", {"arch": "resnet20", "epochs": 3})
    record = {"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "train_acc": 0.1, "val_acc": 0.1, "epoch_s": 3.0}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(record)[:20])  # killed mid-append
    summary = aggregate(AggregateConfig(run_dir=str(run)))
    md = (run / "report" / "report.md").read_text()
    assert "training stage: failed" in md and "no eval.json" in md and "no checkpoint" in md
    assert "1 epoch(s) recorded" in md  # the cut-short last line is ignored
    assert "visualization array did not run" in md
    assert summary["figures"] == ["figures/training_curves.png"] and summary["n_images"] == 0


def test_not_a_run_directory(tmp_path, capsys):
    with pytest.raises(AggregateError, match="not a run directory"):
        aggregate(AggregateConfig(run_dir=str(tmp_path / "nothing")))
    assert job.main(job.get_args_parser().parse_args(["--run", str(tmp_path)])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --run") and "hint:" in err[0]
    assert not (tmp_path / "report").exists()
