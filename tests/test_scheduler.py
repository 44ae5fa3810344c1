import pickle
import subprocess

import pytest

from hpcviz import scheduler as jobstate
from hpcviz.scheduler import JobFailed, query_state, read_results, result_paths, wait_for_job


def fake_sources(monkeypatch, **answers):
    """answers: source name -> state string, or an exception to raise."""
    def make(name):
        def ask(job_id):
            a = answers.get(name, "")
            if isinstance(a, BaseException):
                raise a
            return a
        return ask
    monkeypatch.setattr(jobstate, "SOURCES", tuple((n, make(n)) for n in ("sacct", "squeue", "scontrol")))


def test_sources_in_order_with_fallback(monkeypatch):
    fake_sources(monkeypatch, sacct="RUNNING", squeue="PENDING")
    assert query_state("7") == ("RUNNING", "sacct")
    fake_sources(monkeypatch, sacct=OSError("slurmdbd down"), squeue="PENDING")
    assert query_state("7") == ("PENDING", "squeue")
    fake_sources(monkeypatch, sacct=subprocess.TimeoutExpired("sacct", 20), squeue="", scontrol="COMPLETED")
    assert query_state("7") == ("COMPLETED", "scontrol")
    fake_sources(monkeypatch, sacct=FileNotFoundError("sacct"))
    assert query_state("7") == ("GONE", "none")
    fake_sources(monkeypatch, sacct="FAILED", squeue="PENDING")  # requeued: the accounting still shows the end
    assert query_state("7") == ("PENDING", "squeue")
    fake_sources(monkeypatch, sacct="FAILED", squeue="", scontrol="FAILED")  # really ended
    assert query_state("7") == ("FAILED", "sacct")


def test_a_job_gone_without_result_ends_the_wait(monkeypatch, tmp_path):
    fake_sources(monkeypatch, sacct=OSError("no accounting"))
    (tmp_path / "9_0_log.err").write_text("line 1\nTraceback: it broke\n")
    with pytest.raises(JobFailed, match="job 9 ended \\(GONE, from none\\) without writing its result") as e:
        wait_for_job("9", tmp_path, ntasks=1, poll_s=0.01, grace_s=0.05)
    assert "it broke" in str(e.value)  # the log tail comes with it


def test_results_and_task_errors(monkeypatch, tmp_path):
    fake_sources(monkeypatch, sacct="RUNNING")
    paths = result_paths(tmp_path, "5", 2)
    assert read_results(paths) is None
    for k, p in enumerate(paths):
        p.write_bytes(pickle.dumps(("success", {"rank": k})))
    assert wait_for_job("5", tmp_path, ntasks=2, poll_s=0.01) == [{"rank": 0}, {"rank": 1}]
    paths[1].write_bytes(pickle.dumps(("error", "Traceback ...\nValueError: --data x: bad\n")))
    with pytest.raises(JobFailed, match="job 5 failed: ValueError: --data x: bad"):
        wait_for_job("5", tmp_path, ntasks=2, poll_s=0.01)


def test_timeout_says_the_job_keeps_running(monkeypatch, tmp_path):
    fake_sources(monkeypatch, sacct="PENDING")
    with pytest.raises(JobFailed, match="still PENDING .* it keeps running"):
        wait_for_job("3", tmp_path, ntasks=1, poll_s=0.01, timeout_s=0.05)


def test_array_task_ids_expand():
    assert jobstate._expand_tasks("12_3", "12") == [3]
    assert jobstate._expand_tasks("12_[0-2,5%2]", "12") == [0, 1, 2, 5]
    assert jobstate._expand_tasks("12_[7]", "12") == [7]
    assert jobstate._expand_tasks("123_1", "12") == [] and jobstate._expand_tasks("12", "12") == []


def test_array_states_merge_sacct_and_squeue(monkeypatch):
    def run(cmd, timeout=20.0):
        if cmd[0] == "sacct":
            return "7_0|COMPLETED\n7_1|CANCELLED by 0\n7_[2-3]|PENDING\n"
        return "7_3|RUNNING\n"
    monkeypatch.setattr(jobstate, "_run", run)
    assert jobstate.array_states("7") == {0: "COMPLETED", 1: "CANCELLED", 2: "PENDING", 3: "RUNNING"}

    def broken(cmd, timeout=20.0):
        raise OSError("slurmdbd: connection refused")
    monkeypatch.setattr(jobstate, "_run", broken)
    assert jobstate.array_states("7") == {}
