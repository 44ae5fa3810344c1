"""Progress lines of an array task in a log file: what runs, how far, and an ETA from the rate so far."""
import logging
import re

from hpcviz.log import LOGGER, TaskProgress, _clock


def test_task_progress_lines_with_eta(monkeypatch):
    clock = iter([100.0, 100.0, 110.0, 115.0, 130.0, 131.0])  # start, then each update's time
    monkeypatch.setattr("hpcviz.log.time.perf_counter", lambda: next(clock))
    logger, records = logging.getLogger(LOGGER), []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(handler)
    try:
        p = TaskProgress(40, "shard 3", every_s=10.0)  # not a terminal under pytest: plain lines
        p.update(0, "forward, images 0/20")            # the first update is logged at once (no rate yet)
        p.update(10, "forward, images 10/20")          # 10 s later: 10 of 40 done, 30 to go at 1/s
        p.update(12, "inversion: step 5 of at most 300")  # 5 s after the last line: not logged
        p.update(20, "inversion: step 50 of at most 300")  # 30 s in, 20 done: 30 s to go
        p.update(21, "writing", stage="write")   # a new stage: logged at once
        p.close()
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records]
    assert len(lines) == 4, lines
    assert lines[0] == "shard 3: forward, images 0/20; 0% done, 0s elapsed, ETA ?"
    assert lines[1] == "shard 3: forward, images 10/20; 25% done, 10s elapsed, ETA 30s"
    assert re.fullmatch(r"shard 3: inversion: step 50 of at most 300; 50% done, 30s elapsed, ETA 30s", lines[2])
    assert lines[3].startswith("shard 3: writing; 52% done, 31s elapsed")


def test_clock():
    assert [_clock(s) for s in (0, 59.4, 61, 3600, 3725)] == ["0s", "59s", "1m01s", "1h00m", "1h02m"]
    assert _clock(float("nan")) == "?"
