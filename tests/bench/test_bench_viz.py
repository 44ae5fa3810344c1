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
