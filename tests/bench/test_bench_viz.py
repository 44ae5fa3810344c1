import pytest

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
    assert all(1 <= new["mean_steps"][b] <= 300 for b in blocks)
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
