"""jobs/import_model.py (hpcviz.importing): a run from a torchvision-layout state dict, with no training.

Random weights throughout (nothing can be downloaded here): what matters is that the imported run computes
exactly what the original model computes, and that every later stage takes it as a trained run."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from hpcviz.config import IMAGENET_MEAN, IMAGENET_STD, ImportConfig, TrainConfig
from hpcviz.data.sources import fingerprint, load_images
from hpcviz.data.transforms import channel_stats, normalize, split_indices
from hpcviz.models import build_model, from_checkpoint
from hpcviz.rundir import RunDir
from hpcviz.train import checkpoint

from conftest import run_job

R18 = ["--arch", "resnet18", "--data", "builtin:10", "--image-size", "32", "--device", "cpu"]
# the visualization kept small: two blocks, deconvnet at one, no inversion
VIZ = ["--cluster", "debug", "--device", "cpu", "--images", "2", "--tasks", "1", "--blocks", "conv1,layer1.0",
       "--deconv-blocks", "layer1.0", "--invert-blocks", "none", "--featviz-blocks", "layer1.0", "--featviz-steps", "2"]


def cli(script: str, *args: object) -> subprocess.CompletedProcess:
    return run_job(script, *args, timeout=300, cpu=True)


def run_import(capsys, *args: object) -> tuple[int, str, list[str]]:
    """jobs/import_model.py's main in this process (no torch import per call): (exit code, stdout, stderr lines)."""
    from hpcviz.commands import importing
    try:
        code = importing.main(importing.get_args_parser(add_help=True).parse_args([str(a) for a in args]))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """BatchNorm statistics and affine parameters away from their defaults, so that eval outputs depend on them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """State dicts of every kind the importer meets, and a 3-class image folder."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(randomized(torchvision.models.resnet18(num_classes=10), 1).state_dict(), d / "r18.pt")
    cifar = randomized(build_model("resnet18", 3, "cifar"), 2).state_dict()  # DataParallel-wrapped, under a key
    torch.save({"state_dict": {f"module.{k}": v for k, v in cifar.items()}, "epoch": 7}, d / "r18-cifar3.pt")
    torch.save(randomized(torchvision.models.resnet50(num_classes=10), 3).state_dict(), d / "r50.pt")
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), d / "r18-k5.pt")
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), d / "r34.pt")
    torch.save(torchvision.models.resnet18(num_classes=10), d / "pickled-model.pt")
    torch.save([1, 2, 3], d / "list.pt")
    (d / "garbage.pt").write_bytes(b"not a state dict at all")
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee", "cow")):
        (d / "three" / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(d / "three" / name / f"{i}.png")
    return d


@pytest.fixture(scope="module")
def imported(files, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("imported") / "r18"
    r = cli("import_model.py", "--weights", files / "r18.pt", *R18, "--run", run)
    assert r.returncode == 0, r.stderr[-3000:]
    return run, r


def val_split(spec: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels of the validation split, train positions), carved independently of hpcviz.train."""
    ds = load_images(spec, size)
    train_idx, val_idx = split_indices(ds.labels, 0.1, seed=0)
    return ds.images[val_idx], ds.labels[val_idx], train_idx


def test_imported_run_computes_what_torchvision_computes(imported, files):
    run, r = imported
    state = checkpoint.load_checkpoint(run / "checkpoints")
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(torch.load(files / "r18.pt", weights_only=True))
    images, labels, _ = val_split("builtin:10", 32)
    x = normalize(images, IMAGENET_MEAN, IMAGENET_STD)  # the default for torchvision weights
    with torch.no_grad():
        expected = tv.eval()(x)
        assert torch.equal(from_checkpoint(state)(x), expected)
    # recorded as training records a run: the same keys, ImageNet's statistics, the data's fingerprint
    assert (state["mean"], state["std"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert state["data_fingerprint"] == fingerprint(load_images("builtin:10", 32))
    assert state["epoch"] == state["config"]["epochs"] and state["step"] == 0  # finished: nothing left to train
    sha = checkpoint.sha256_file(files / "r18.pt")
    assert state["imported"] == {"weights": str(files / "r18.pt"), "sha256": sha, "normalize": "imagenet"}
    config = RunDir(run).read_config()["train"]
    assert set(config) == set(TrainConfig().__dict__) and config == state["config"]
    assert (config["arch"], config["recipe"], config["init"]) == ("resnet18", "import", str(files / "r18.pt"))
    record = RunDir(run).manifest().train
    assert (record.status, record.imported_from, record.imported_sha256) == ("done", str(files / "r18.pt"), sha)
    # eval.json as training's end writes it, with the imported normalisation
    ev = RunDir(run).read_eval()
    assert ev["n"] == len(labels) and ev["checkpoint_sha256"] == state["sha256"] and ev["train_n"] == 90
    assert ev["accuracy"] == pytest.approx(float((expected.argmax(1) == labels).float().mean()))
    assert ev["loss"] == pytest.approx(float(F.cross_entropy(expected, labels)), rel=1e-5)
    assert record.val_accuracy == ev["accuracy"]
    out = r.stdout
    assert f"-> {run} (no training)" in out and "10 classes: circle, square" in out and sha in out
    assert state["sha256"] in out and f"val {100 * ev['accuracy']:.2f}%" in out
    assert f"next:       python jobs/launch_viz.py --run {run} " in out


def test_cifar_stem_wrapped_state_dict_with_the_data_statistics(files, tmp_path, capsys):
    run = tmp_path / "c3"
    code, _, err = run_import(capsys, "--weights", files / "r18-cifar3.pt", "--arch", "resnet18", "--stem", "cifar",
                              "--data", files / "three", "--image-size", "16", "--normalize", "data", "--device", "cpu",
                              "--run", run)
    assert code == 0, err
    state = checkpoint.load_checkpoint(run / "checkpoints")
    ds = load_images(str(files / "three"), 16)
    train_idx, val_idx = split_indices(ds.labels, 0.1, seed=0)
    mean, std = channel_stats(ds.images[train_idx])  # what training normalises with
    assert (state["mean"], state["std"], state["classes"]) == (list(mean), list(std), ["ant", "bee", "cow"])
    original = build_model("resnet18", 3, "cifar")
    wrapped = torch.load(files / "r18-cifar3.pt", weights_only=True)["state_dict"]
    original.load_state_dict({k.removeprefix("module."): v for k, v in wrapped.items()})
    x = normalize(ds.images[val_idx], mean, std)
    with torch.no_grad():
        assert torch.equal(from_checkpoint(state)(x), original.eval()(x))
    assert RunDir(run).read_eval()["n"] == 3


def test_resnet50_with_explicit_statistics_and_no_evaluation(files, tmp_path, capsys):
    run = tmp_path / "r50"
    code, out, err = run_import(capsys, "--weights", files / "r50.pt", *R18[2:], "--arch", "resnet50", "--run", run,
                                "--normalize", "custom", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--no-eval")
    assert code == 0, err
    assert "not evaluated (--no-eval)" in out and not RunDir(run).eval_file().exists()
    record = RunDir(run).manifest().train
    assert record.status == "done" and record.val_accuracy is None
    state = checkpoint.load_checkpoint(run / "checkpoints")
    assert (state["mean"], state["std"]) == ([0.5] * 3, [0.25] * 3)
    tv = torchvision.models.resnet50(num_classes=10)
    tv.load_state_dict(torch.load(files / "r50.pt", weights_only=True))
    x = normalize(val_split("builtin:10", 32)[0][:4], state["mean"], state["std"])
    with torch.no_grad():
        assert torch.equal(from_checkpoint(state)(x), tv.eval()(x))


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# (weights file, extra arguments, what the error line must say); every case is refused with exit 2
BAD = [
    ("r34.pt", R18, "not a resnet18 (imagenet stem) with 10 outputs: unexpected layer1.2.conv1.weight"),
    ("r34.pt", R18, "hint: the file is a resnet34 with the imagenet stem: pass --arch resnet34 --stem imagenet"),
    ("r18.pt", [*R18, "--stem", "cifar"], "conv1.weight is (64, 3, 7, 7) in the file, (64, 3, 3, 3) here"),
    ("r18-cifar3.pt", [*R18[:2], "--data", "{files}/three", "--image-size", "16"],
     "conv1.weight is (64, 3, 3, 3) in the file, (64, 3, 7, 7) here; hint: the file is a resnet18 with the cifar "
     "stem: pass --arch resnet18 --stem cifar"),
    ("r18-k5.pt", R18, "fc.weight is (5, 512) in the file, (10, 512) here; fc.bias is (5,) in the file, (10,) here; "
     "hint: its fc has 5 outputs but --data builtin:10 has 10 classes"),
    ("r18-cifar3.pt", [*R18, "--stem", "cifar"], "fc.weight is (3, 512) in the file, (10, 512) here"),
    ("missing.pt", R18, "--weights {files}/missing.pt: no such file"),
    ("garbage.pt", R18, "garbage.pt: not a readable state dict (UnpicklingError)"),
    ("pickled-model.pt", R18, "a pickled model object is refused"),
    ("list.pt", R18, "list.pt: holds a list, not a state dict of tensors"),
    ("r18.pt", [*R18, "--normalize", "custom", "--mean", "0.5,0.5,0.5"], "--normalize custom needs --mean and --std"),
    ("r18.pt", [*R18, "--std", "58,57,57", "--normalize", "custom", "--mean", "0.5,0.5,0.5"], "--std 58,57,57"),
    ("r18.pt", [*R18, "--arch", "resnet19"], "--arch 'resnet19': not one of resnet18"),
    ("r18.pt", [*R18, "--data", "builtin:1"], "validation split would be empty"),
    ("r18.pt", [*R18, "--run", "{run}"], "already holds a run"),
]


def test_bad_input_is_one_line_and_writes_nothing(files, imported, tmp_path, capsys):
    """Exit 2, one `error:` line, and no run directory made (or the existing run unchanged, byte for byte)."""
    existing = imported[0]
    before = snapshot(existing)
    failures = []
    for k, (name, extra, message) in enumerate(BAD):
        new = tmp_path / f"new{k}"
        args = [a.replace("{files}", str(files)).replace("{run}", str(existing)) for a in extra]
        code, _, lines = run_import(capsys, "--weights", files / name, "--run", new, *args)
        message = message.replace("{files}", str(files))
        problems = [] if code == 2 else [f"exit {code}"]
        if len(lines) != 1 or not lines[0].startswith("error:") or message not in lines[0]:
            problems.append(f"stderr {lines}, expected one error line with {message!r}")
        if new.exists():
            problems.append(f"{new} was made")
        if problems:
            failures.append(f"{name} {' '.join(args)}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)
    assert snapshot(existing) == before


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_write_removes_what_it_wrote(files, tmp_path, monkeypatch, existed):
    from hpcviz.train import weights as importing
    run = RunDir(tmp_path / "run")
    if existed:  # a directory that is not a run yet: its own files stay
        run.path.mkdir()
        (run.path / "notes.txt").write_text("mine")
    cfg = ImportConfig(weights=str(files / "r18.pt"), arch="resnet18", data="builtin:10", device="cpu",
                       run_dir=str(run.path)).validate()
    prepared = importing.prepare_import(cfg)

    def broken(*args, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(importing, "final_eval", broken)
    with pytest.raises(OSError), run.lock():
        importing.write_import(prepared)
    if existed:
        assert sorted(p.name for p in run.path.iterdir()) == ["notes.txt"]
    else:
        assert not run.path.exists()


@pytest.mark.slow
def test_later_stages_take_the_imported_run(imported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(imported[0], run)
    r = cli("launch_viz.py", "--run", run, *VIZ)
    assert r.returncode == 0, r.stderr[-3000:]
    assert RunDir(run).viz_file.is_file()
    r = cli("aggregate.py", "--run", run, "--report-images", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "report" / "report.html").is_file()
    md = (run / "report" / "report.md").read_text()
    assert "| recipe | import |" in md and "Not trained here: the weights were imported from" in md
    # the dataset examples of a model trained elsewhere: merged lists, projections, the report's section
    from hpcviz import store
    names = store.list_datasets(RunDir(run).viz_file)
    assert {"topk/layer1.0/index", "selectivity/layer1.0", "examples/layer1.0/patch"} <= set(names)
    assert "## 7. What the channels respond to" in md and "figures/examples_layer1.0.png" in md
    r = cli("inspect_results.py", run, "--block", "layer1.0", "--channel", "63")
    assert r.returncode == 0 and "layer1.0 channel 63: its top 2 of 2 images" in r.stdout, r.stderr[-3000:]
    r = cli("evaluate.py", "--run", run, "--data", "builtin:10", "--name", "all", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert RunDir(run).read_eval("all")["n"] == 100
    r = cli("inspect_results.py", run)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_the_pipeline_continues_an_imported_run_without_training(imported, tmp_path):
    """launch_pipeline --resume on an imported run: training is over (its checkpoint stands at the end of its
    epochs), so it only evaluates again, with the checkpoint's normalisation, then visualizes and reports."""
    run = tmp_path / "run"
    shutil.copytree(imported[0], run)
    last = (run / "checkpoints" / "last.pt").read_bytes()
    r = cli("launch_pipeline.py", "--run", run, "--resume", *R18, "--batch-size", "32", *VIZ[2:],
            "--report-images", "1", "--cluster", "debug")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "checkpoints" / "last.pt").read_bytes() == last and RunDir(run).read_metrics() == []
    ev, before = RunDir(run).read_eval(), json.loads((imported[0] / "eval.json").read_text())
    assert (ev["loss"], ev["confusion"]) == (before["loss"], before["confusion"])
    record = RunDir(run).manifest().train
    assert record.status == "done" and record.imported_from == before["config"]["init"]
    assert (run / "report" / "report.html").is_file()
