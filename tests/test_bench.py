from hpcviz.bench import bench_train_throughput, time_to_accuracy
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
