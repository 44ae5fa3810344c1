import pytest
import torch

from hpcviz.bench.viz import bench_train_throughput, bench_viz, time_to_accuracy
from hpcviz.config import TrainConfig


def test_train_throughput_reports_both_loops_and_the_ratio(tmp_path):
    cfg = TrainConfig(data="builtin:10", image_size=16, arch="resnet20", batch_size=16, device="cpu")
    out = bench_train_throughput(cfg, steps=50, workers=0)  # clamped to what the 90 images allow
    assert out["steps"] == 90 // 16 - 3
    assert out["project_images_per_s"] > 0 and out["plain_images_per_s"] > 0
    assert out["ratio"] == out["project_images_per_s"] / out["plain_images_per_s"]  # CPU: vs the DataLoader loop
    assert out["eager_resident_images_per_s"] > 0 and out["placement"] == "device"


def test_time_to_accuracy_reads_the_epoch_that_reached_the_target(tmp_path):
    cfg = TrainConfig(data="builtin:10", image_size=16, arch="resnet20", batch_size=16, epochs=2, lr=0.05,
                      device="cpu", run_dir=str(tmp_path / "tta"))
    out = time_to_accuracy(cfg, target=0.0)
    assert out["reached"] and out["epoch"] == 1 and out["wall_minutes_to_target"] > 0
    out = time_to_accuracy(TrainConfig(**{**cfg.__dict__, "run_dir": str(tmp_path / "t2")}), target=1.01)
    assert not out["reached"] and out["epoch"] is None


@pytest.mark.slow
def test_viz_task_baseline_and_default_on_the_same_images(tmp_path):
    from hpcviz.train.loop import train
    run = tmp_path / "run"
    train(TrainConfig(data="builtin:20", image_size=16, arch="resnet20", epochs=1, batch_size=32, lr=0.05,
                      device="cpu", run_dir=str(run), log_every=1000))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    out = bench_viz(run, tmp_path / "scratch", images=4, device="cpu", batch_size=2, baseline_steps=20)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # the run itself is never written
    blocks = ["conv1", "layer1.2", "layer2.2", "layer3.2"]
    base, new = out["baseline"], out["default"]
    assert base["mean_steps"] == {b: 20.0 for b in blocks}  # no stopping rule: every step
    held = 5 * round(0.3 * 800 / 5)  # the homotopy's soft phase: every row runs at least that long
    assert all(held <= new["mean_steps"][b] <= 800 for b in blocks), new["mean_steps"]
    for m in (base, new):
        s = m["seconds_per_image"]
        assert set(s) == {"load", "forward", "topk", "deconv", "inversion", "write", "total"}
        assert s["total"] >= s["load"] + s["forward"] + s["deconv"] + s["inversion"] > 0
        assert set(m["median_error"]) == set(blocks) and all(0 <= e < 10 for e in m["median_error"].values())
    assert out["ratio"] == base["seconds_per_image"]["total"] / new["seconds_per_image"]["total"]


@pytest.mark.slow
def test_the_gpu_projection_is_its_flops_at_the_stated_rates():
    """benchmark.py gpu-projection: per stem, the exact work (a forward and the deconvnet of every block x 3
    paths) at the fp32 rate plus every inverted block's step cost x the steps at the bf16 rate; linear in the
    images and the steps, and the step cost is one forward to the block and one backward (about 3 forwards)."""
    from hpcviz.bench.featviz import H200_PEAK_TFLOPS, row_costs
    from hpcviz.bench.viz import project_viz_gpu
    p = project_viz_gpu("resnet20", 16, images=100, steps=10, efficiency=0.5)
    q = project_viz_gpu("resnet20", 16, images=300, steps=20, efficiency=0.5)
    for stem, r in p["stems"].items():
        rate32, rate16 = (H200_PEAK_TFLOPS[k] * 1e12 * 0.5 for k in ("fp32", "bf16"))
        want = 100 * (r["exact_gflop_per_image"] * 1e9 / rate32 + r["inversion_gflop_per_image"] * 1e9 / rate16) / 60
        assert r["minutes"] == pytest.approx(want)
        assert q["stems"][stem]["inversion_gflop_per_image"] == pytest.approx(2 * r["inversion_gflop_per_image"])
        assert q["stems"][stem]["minutes"] > 3 * r["minutes"]
    costs = row_costs("resnet20", 16, "cifar")
    conv1 = 2 * 16 * 16 * 16 * 3 * 9  # FLOPs (2 per multiply-add) of the 3x3 conv 3 -> 16 at 16 x 16, by hand
    assert costs["conv1"]["flops"] == 2 * conv1  # its forward, and the backward to the input (no weight grads)
    assert costs["layer3.2"]["flops"] > costs["layer1.0"]["flops"] > costs["conv1"]["flops"]


@pytest.mark.slow
def test_resnet50_featviz_timing_extrapolates_the_skipped_blocks_by_flops(monkeypatch):
    """benchmark.py featviz --resnet50-seconds: the first block always runs; a block that would outlast the
    budget is skipped and its time is its FLOPs (channels x FLOPs per row-step x the measured mean steps) at
    the rate measured; the blocks measured and skipped cover every channel once."""
    from hpcviz.bench import featviz as bf
    from hpcviz.explain.featviz import FeatvizConfig
    monkeypatch.setattr(bf, "FeatvizConfig", lambda **kw: FeatvizConfig(**{**kw, "steps": 4, "check_every": 2,
                                                                             "window": 2}))
    r = bf.bench_resnet50(1e-3, torch.device("cpu"), size=32)
    assert list(r["blocks"]) == ["conv1"] and r["blocks"]["conv1"]["rows_at_once"] == 64
    costs = bf.row_costs("resnet50", 32)
    assert r["measured_channels"] + r["rest_channels"] == sum(c["channels"] for c in costs.values()) == 15168
    m = r["blocks"]["conv1"]
    assert r["tflop_per_s"] == pytest.approx(m["tflop"] / m["seconds"])
    rest = sum(c["channels"] * c["flops"] for b, c in costs.items() if b != "conv1")
    assert r["rest_s_extrapolated"] == pytest.approx(rest * m["mean_steps"] / 1e12 / r["tflop_per_s"])
    assert r["total_min"] == pytest.approx((m["seconds"] + r["rest_s_extrapolated"]) / 60)


@pytest.mark.slow
def test_homotopy_comparison_runs_both_on_the_same_images(monkeypatch):
    """benchmark.py invert --homotopy: the default and the same without its homotopy, per block the median and
    90th percentile of the stored (exact) errors."""
    from hpcviz.bench import viz as bv
    from hpcviz.explain.inversion import InversionConfig
    from hpcviz.models import build_model
    seen = []
    real = bv.invert
    monkeypatch.setattr(bv, "invert", lambda *a, **kw: seen.append(kw["cfg"]) or real(*a, **kw))
    monkeypatch.setattr(bv, "InversionConfig", lambda **kw: InversionConfig(**{"steps": 20, **kw}))
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    r = bv.bench_homotopy(build_model("resnet20", 10).eval(), x, (0.5,) * 3, (0.25,) * 3, ["conv1", "layer2.0"])
    assert [(c.soft_relu, c.soft_pool) for c in seen] == [(0.0, 0.0), (0.5, 2.0)]
    for name in ("without", "default"):
        for b in ("conv1", "layer2.0"):
            v = r[name]["blocks"][b]
            assert 0 <= v["median"] <= v["p90"] and 5 <= v["mean_steps"] <= 20
