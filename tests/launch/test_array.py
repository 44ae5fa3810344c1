"""launch.array: a local run on CPUs runs its shard in the launcher when one worker would take them all, a pool
otherwise, and collates once at the end either way; the projections run in the launcher, reading once."""
import os

import pytest

from hpcviz.config import LaunchConfig, VizConfig
from hpcviz.launch import array
from hpcviz.rundir import RunDir
from hpcviz.viz import projection

from conftest import train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("arrayrun") / "run")


def _request(run, tasks: int) -> VizConfig:
    return VizConfig(run_dir=str(run), images=4, tasks=tasks, device="cpu", invert_steps=3, topk=2,
                     featviz_blocks=["layer3.2"], featviz_steps=2)


@pytest.fixture
def counted(monkeypatch):
    """{'collate': calls, 'executors': calls} of this command."""
    calls = {"collate": 0, "executors": 0}
    collate, make_executor = array.collate, array.make_executor

    def counting_collate(*a, **kw):
        calls["collate"] += 1
        return collate(*a, **kw)

    def counting_executor(*a, **kw):
        calls["executors"] += 1
        return make_executor(*a, **kw)
    monkeypatch.setattr(array, "collate", counting_collate)
    monkeypatch.setattr(array, "make_executor", counting_executor)
    return calls


def test_one_worker_is_this_process_and_the_run_is_collated_once(trained, counted, tmp_path):
    run = RunDir(trained)
    out = array.launch_viz(_request(trained, 1), LaunchConfig(cluster="local", gpus=0), fresh=True)
    assert counted == {"collate": 1, "executors": 0}  # no task process; shards, parts and featviz, then one collation
    assert out["failed"] == [] and out["projection_failed"] == [] and out["featviz_failed"] == []
    assert out["incomplete"] == "" and out["collation"]["path"] == run.viz_file
    assert out["ids"] == [str(os.getpid())] and run.manifest().viz.tasks == {f"{os.getpid()}:0": 0}
    assert not list(run.logs.glob("*_log.out"))  # no submitit job was started
    again = array.launch_viz(_request(trained, 1), LaunchConfig(cluster="local", gpus=0))
    assert again["todo"] == [] and again["incomplete"] == ""  # all current: nothing redone


def test_several_workers_are_a_pool_and_the_run_is_still_collated_once(trained, counted, monkeypatch):
    monkeypatch.setattr(array.dist, "cores", lambda: 2)
    out = array.launch_viz(_request(trained, 2), LaunchConfig(cluster="local", gpus=0), fresh=True)
    assert counted == {"collate": 1, "executors": 1} and len(out["ids"]) == 2  # two workers, one shard each
    assert out["failed"] == [] and out["incomplete"] == ""


def test_the_projections_here_read_once_and_a_failed_part_is_one_line(trained, monkeypatch):
    run = RunDir(trained)
    array.launch_viz(_request(trained, 1), LaunchConfig(cluster="local", gpus=0), fresh=True)
    plan = run.read_plan()
    n = len(projection.plan_parts(run, plan))
    for i in range(n):
        run.examples_part(i).unlink()
    loads, done = [], []
    load, project_range = projection._checkpoint, projection.project_range
    monkeypatch.setattr(projection, "_checkpoint", lambda *a: loads.append(1) or load(*a))

    def failing_range(run_, plan_, state, i, *a, **kw):
        if i == 1:
            raise MemoryError("part 1 ran out of memory")
        done.append(i)
        return project_range(run_, plan_, state, i, *a, **kw)
    monkeypatch.setattr(projection, "project_range", failing_range)
    failed = array.project_here(run, plan)
    assert failed == ["projection part 1: part 1 ran out of memory"] and loads == [1]
    assert done == [i for i in range(n) if i != 1]  # the others still ran
    done.clear()
    monkeypatch.setattr(projection, "project_range", lambda *a, **kw: done.append(a[3]) or project_range(*a, **kw))
    assert array.project_here(run, plan) == [] and done == [1]  # the others are current: skipped
    monkeypatch.setattr(projection, "project_range", lambda *a, **kw: (_ for _ in ()).throw(MemoryError("x")))
    run.examples_part(0).unlink()
    with pytest.raises(MemoryError):
        projection.project_part(str(run.path), 0)  # an array task: its failure is its exception


def test_arrays_waited_for_are_collated_once_after_the_projections_and_featviz(trained, counted, monkeypatch):
    """Several local GPUs or SLURM --wait (`here` false): shards, projection and featviz parts as arrays (here a
    local pool each), the projections judged stale against the shards' own lists, then one collation."""
    monkeypatch.setattr(array, "here", lambda launch: False)
    run = RunDir(trained)
    for made in run.viz_dir.glob("*/*-*.h5"):  # the other tests' shards and parts would be current
        made.unlink()
    out = array.launch_viz(_request(trained, 1), LaunchConfig(cluster="local", gpus=0), fresh=True)
    assert counted["collate"] == 1 and counted["executors"] == 3  # shards, projections, featviz
    assert out["projection_ids"] and out["featviz_ids"] and out["incomplete"] == ""
    assert projection.stale_parts(run, run.read_plan()) == []  # current against viz.h5's lists too
    counted.update(collate=0, executors=0)
    again = array.launch_viz(_request(trained, 1), LaunchConfig(cluster="local", gpus=0))
    assert counted == {"collate": 1, "executors": 0} and again["projection_ids"] == []  # all current
