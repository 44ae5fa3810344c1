"""benchmark.py examples, small: every figure it reports is there, and the merge is exact."""
import pytest

from hpcviz.bench.examples import bench_examples


@pytest.mark.slow
def test_examples_benchmark_reports_the_map_merge_exactness_and_projections(tmp_path):
    r = bench_examples(tmp_path / "scratch", "builtin:8", images=30, tasks=2, k=3, arch="resnet20", stem="cifar",
                       image_size=16, batch_size=8, device="cpu", project_channels=2)
    assert r["images"] == 30 and r["tasks"] == 2 and r["blocks"] == 10
    m = r["map"]
    assert m["shard0_without_s"] > 0 and m["shard0_with_s"] > 0 and 0 < m["topk_share_of_tasks"] < 1
    assert len(m["task_seconds"]) == 2
    assert r["merge"]["n_images"] == 30 and r["merge"]["collate_s"] > 0
    assert r["exactness"] == {**r["exactness"], "exact": True, "blocks_checked": 10, "wrong": {}}
    p = r["projection"]
    assert set(p["seconds_per_channel"]) == set(p["channels"]) and p["channels"]["layer3.2"] == 64
    assert p["all_channels_s"] == sum(p["seconds_per_channel"][b] * c for b, c in p["channels"].items())
    assert set(p["full_seconds_per_channel"]) == set(p["channels"]) and p["full_all_channels_s"] > 0
