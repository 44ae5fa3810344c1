"""benchmark.py viz --command: the timeline of a command, and both sides end to end (small)."""
import subprocess
import sys
import time

import pytest

from hpcviz.bench.command import ROOT, bench_command, parse_timeline, task_span, time_command

NEW = ["2026-12-05 08:00:01 [rank 0] INFO 8 images in 1 shards; 1 to do",
       "2026-12-05 08:00:18 [rank 0] INFO shard 0 done: 8 images in 12.5 s (inversion 11.0) -> x.h5",
       "2026-12-05 08:00:21 [rank 0] INFO projection part 0: conv1 channels 0-15, 144 projections in 1.5 s",
       "2026-12-05 08:00:22 [rank 0] INFO projection part 1: layer1.0 channels 0-15, 144 projections in 0.5 s "
       "(0.031 s per channel)",
       "2026-12-05 08:00:38 [rank 0] INFO featviz part 0: layer1.0, 16 channels in 14.0 s (0.875 s per channel) on cpu"]
OLD = ["2026-12-01 08:01:09 [rank 0] INFO 22 figures in r/viz/figures"]


def test_the_parts_sum_to_the_whole_and_the_shard_clock_is_its_own():
    parts = parse_timeline(NEW, 45.0, (4.0, 20.0))
    assert parts == {"start-up": 4.0, "task": 16.0, "projections": 2.0, "feature visualization": 14.0,
                     "collation and figures": 9.0, "shard work": 12.5}
    old = parse_timeline(OLD, 75.0, (5.0, 45.0))  # an older task logs nothing: its whole process is its work
    assert old["task"] == old["shard work"] == 40.0 and old["projections"] == 0 and old["collation and figures"] == 30


def test_a_shard_run_in_the_launcher_is_its_own_clock_and_start_up_is_the_rest():
    lines = [*NEW, "2026-12-05 08:00:39 [rank 0] INFO collation: 1 of 1 shards in 0.5 s"]
    parts = parse_timeline(lines, 35.0, None)
    assert parts == {"start-up": 6.0, "task": 12.5, "projections": 2.0, "feature visualization": 14.0,
                     "collation": 0.5, "shard work": 12.5}
    with pytest.raises(RuntimeError, match="no shard's clock"):
        parse_timeline(OLD, 75.0, None)


def _submitit(t: float, what: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int(t % 1 * 1000):03d}"
    return f"submitit INFO ({stamp}) - {what}\n"


def test_the_task_span_comes_from_submitits_stamps_not_from_the_training_log(tmp_path):
    (tmp_path / "12_0_log.out").write_text(_submitit(1000.25, "Starting with JobEnvironment(job_id=12)")
                                           + _submitit(1009.5, "Job completed successfully"))
    (tmp_path / "DEBUG_1_0_log.out").write_text(_submitit(900.0, "Starting with JobEnvironment(job_id=1)"))
    assert task_span(tmp_path, 1000.0) == pytest.approx((0.25, 9.5))
    with pytest.raises(RuntimeError, match="no local task"):
        task_span(tmp_path / "none", 0.0)


def test_a_command_is_timed_with_its_tasks_log(tmp_path):
    (tmp_path / "logs").mkdir()
    script = ("import time, pathlib; t = time.time(); time.sleep(0.8); print('projection part 0: conv1 channels 0-3, "
              "12 projections in 0.5 s'); f = lambda t: time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t)) + "
              "',%03d' % int(t % 1 * 1000); pathlib.Path('logs/5_0_log.out').write_text("
              "'submitit INFO (%s) - Starting with x\\n' % f(t + 0.1) + 'submitit INFO (%s) - Job completed\\n' % "
              "f(t + 0.2))")
    total, parts = time_command([sys.executable, "-c", script], tmp_path, {}, tmp_path / "logs")
    assert total >= 0.8 and parts["projections"] == 0.5 and 0.05 < parts["task"] < 0.15
    assert parts["collation and figures"] > 0  # the rest: 0.8 s of sleep less the parts
    assert sum(v for k, v in parts.items() if k != "shard work") == pytest.approx(total)
    with pytest.raises(RuntimeError, match="exit 3"):
        time_command([sys.executable, "-c", "raise SystemExit(3)"], tmp_path, {}, tmp_path / "logs")


@pytest.mark.slow
def test_both_sides_train_and_time_the_whole_command(tmp_path):
    """The baseline at HEAD from a git worktree (its own package imported), this checkout beside it."""
    try:
        r = bench_command(tmp_path, baseline="HEAD", images=2, epochs=1, data="builtin:20",
                          viz_args=("--featviz-blocks", "none", "--invert-steps", "20"))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp_path / "tree-HEAD")],
                       capture_output=True)
    for side in ("ours", "baseline"):
        m = r[side]
        assert m["seconds"] > 0 and m["parts"]["task"] >= m["parts"]["shard work"] > 0 and m["parts"]["projections"] > 0
        assert m["seconds"] == pytest.approx(sum(v for k, v in m["parts"].items() if k != "shard work"), rel=1e-6)
        assert m["median_error"] and all(e >= 0 for e in m["median_error"].values())
    assert r["baseline"]["rev"] == "HEAD" and r["ratio"] == r["baseline"]["seconds"] / r["ours"]["seconds"]
