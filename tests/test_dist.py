import os

import pytest
import torch
import torch.multiprocessing as mp

from hpcviz import dist
from hpcviz.dist import DistError, first_host, port_for_job, read_env, tasks_per_node


@pytest.mark.parametrize("nodelist,first", [("gpu[07-09,12]", "gpu07"), ("node1,node2", "node1"),
                                            ("a-b[1-2],c[3]", "a-b1"), ("localhost", "localhost"),
                                            ("n[001]", "n001")])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_read_env_sources_and_precedence():
    assert read_env({}).source == "single" and read_env({}).world_size == 1
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[10-11]",
             "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "2", "SLURM_STEP_ID": "0"}
    e = read_env(slurm)
    assert (e.source, e.rank, e.local_rank, e.world_size, e.master_addr, e.local_world_size) == \
           ("slurm", 3, 1, 4, "gpu10", 2)
    assert e.master_port == port_for_job("123456") == 20000 + 123456 % 40000
    # a requeued run rendezvouses elsewhere than its killed predecessor, every rank on the same port
    requeued = [read_env({**slurm, "SLURM_PROCID": str(r), "SLURM_RESTART_COUNT": "1"}).master_port for r in (0, 3)]
    assert requeued[0] == requeued[1] == port_for_job("123456", 1) != e.master_port
    assert 20000 <= port_for_job("123456", 1) < 60000
    # a step's own task count wins over the job's
    assert read_env({**slurm, "SLURM_STEP_NUM_TASKS": "2"}).world_size == 2
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    e = read_env({**slurm, **torchrun})
    assert (e.source, e.rank, e.world_size, e.master_addr, e.master_port) == ("torchrun", 1, 2, "h", 1234)
    local = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
             "SUBMITIT_LOCAL_JOB_ID": "777"}
    e = read_env({**slurm, **local})
    assert (e.source, e.rank, e.world_size, e.master_addr) == ("submitit-local", 1, 2, "127.0.0.1")


def test_alone_everything_is_a_no_op():
    assert not dist.is_dist() and dist.is_main() and dist.world_size() == 1
    t = torch.tensor([2.0])
    assert dist.all_reduce_sum(t).item() == 2.0
    assert dist.any_ranks([True, False]) == [True, False]
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.barrier()
    dist.cleanup()


def test_bad_rank_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(DistError, match="outside world size"):
        dist.init("cpu")


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from hpcviz.models import build_model
    from hpcviz.train.evaluation import evaluate
    dist.init("cpu", timeout_min=1)
    try:
        torch.manual_seed(0)
        model = build_model("resnet20", 4)
        g = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (13, 3, 8, 8), dtype=torch.uint8, generator=g)  # 13: uneven over 2 ranks
        labels = torch.randint(0, 4, (13,), generator=g)
        from hpcviz.data.placement import feed_tensors
        res = evaluate(model, feed_tensors(images, labels, torch.device("cpu")), (0.5,) * 3, (0.25,) * 3, 4,
                       batch_size=4)
        agree = dist.any_ranks([rank == 1, False])
        out[rank] = (res["n"], res["loss"], res["confusion"].tolist(), agree)
    finally:
        dist.cleanup()


def test_exact_evaluation_with_two_gloo_processes(free_port):
    from hpcviz.models import build_model
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port, out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = build_model("resnet20", 4)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (13, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (13,), generator=g)
    # reference by hand: one forward over all 13 images, confusion counted in a python loop
    model.eval()
    with torch.no_grad():
        logits = model((images.float() / 255 - 0.5) / 0.25)
    ref = [[0] * 4 for _ in range(4)]
    for t, p in zip(labels.tolist(), logits.argmax(1).tolist()):
        ref[t][p] += 1
    ref_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    for rank in (0, 1):
        n, loss, confusion, agree = out[rank]
        assert n == 13  # every image once: none dropped, none duplicated
        assert confusion == ref
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert agree == [True, False]


# ---- the environment SLURM sets on several nodes, launchers that leave things out -------------------

def test_two_node_slurm_step_environment():
    """What srun sets for rank 3 of `-N 2 --ntasks-per-node 2` on gpu[01-02,07] (read off the test cluster)."""
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "4",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[01-02,07]",
           "SLURM_JOB_NODELIST": "gpu[01-02,07]", "SLURM_JOB_ID": "4242", "SLURMD_NODENAME": "gpu02"}
    e = read_env(env)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.master_addr, e.host) == \
           (3, 1, 4, 2, "gpu01", "gpu02")
    assert e.master_port == port_for_job("4242")
    # uneven nodes: the count of this node, not world // nodes
    e = read_env({**env, "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "3",
                   "SLURM_STEP_TASKS_PER_NODE": "2,1"})
    assert (e.world_size, e.local_world_size) == (3, 1)


@pytest.mark.parametrize("spec,counts", [("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]),
                                         ("8,4(x2)", [8, 4, 4])])
def test_tasks_per_node(spec, counts):
    assert tasks_per_node(spec) == counts


def test_batch_script_of_a_multi_task_allocation_is_refused():
    """sbatch -n 4 running python directly (no srun): rank 0 would wait for 3 ranks that never start."""
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n1"}
    with pytest.raises(DistError, match="not started by srun"):
        read_env(env)
    assert read_env({**env, "SLURM_NTASKS": "1"}).world_size == 1  # a one-task allocation is just alone


def test_debug_executor_is_alone_whatever_it_inherited(monkeypatch):
    for k, v in {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DistError, match="srun"):
        dist.init("cpu")
    try:
        env = dist.init("cpu", alone=True)
        assert env.world_size == 1 and not dist.is_dist()
    finally:
        dist.cleanup()


@pytest.mark.parametrize("extra,local", [({"LOCAL_RANK": "2"}, 2),
                                         ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1"}, 1),  # srun wrapper
                                         ({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}, 3),          # mpirun
                                         ({"LOCAL_WORLD_SIZE": "4"}, 1)])                   # 5 % 4
def test_rank_without_local_rank_guesses_from_what_the_launcher_said(extra, local):
    env = {"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "h", **extra}
    assert read_env(env).local_rank == local


def test_rank_without_local_rank_or_any_hint_is_an_error_not_a_wrong_gpu():
    with pytest.raises(DistError, match="without LOCAL_RANK"):
        read_env({"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "h"})
    assert read_env({"RANK": "0", "WORLD_SIZE": "1"}).local_rank == 0


def test_master_addr_is_guessed_only_when_it_is_safe():
    base = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert read_env({**base, "LOCAL_WORLD_SIZE": "4"}).master_addr == "127.0.0.1"  # all on this node
    assert read_env({**base, "LOCAL_WORLD_SIZE": "2", "SLURM_JOB_NODELIST": "gpu[01-02,07]"}).master_addr == "gpu01"
    with pytest.raises(DistError, match="MASTER_ADDR"):
        read_env({**base, "LOCAL_WORLD_SIZE": "2"})  # two nodes, nothing says where rank 0 is: 127.0.0.1 would hang


def _fake_cuda(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("visible,local,expect", [(1, 3, 0), (4, 2, 2), (2, 1, 1)])
def test_pick_device_uses_what_is_visible(monkeypatch, visible, local, expect):
    """--gpus-per-task=1 / --gpu-bind: each task sees only its own GPU, whatever its local rank."""
    _fake_cuda(monkeypatch, visible)
    monkeypatch.setattr(dist, "_ENV", dist.DistEnv(rank=local, local_rank=local, world_size=4, local_world_size=4))
    assert dist.pick_device("auto") == torch.device("cuda", expect)


def test_pick_device_refuses_when_neither_fits(monkeypatch):
    _fake_cuda(monkeypatch, 2)
    monkeypatch.setattr(dist, "_ENV", dist.DistEnv(rank=3, local_rank=3, world_size=4, local_world_size=4))
    with pytest.raises(DistError, match="sees 2 GPUs"):
        dist.pick_device("auto")


def test_init_long_timeout_device_id_and_shared_gpu_check(monkeypatch):
    calls = {}

    def fake_init(backend, rank, world_size, timeout, device_id=None):
        calls.update(backend=backend, timeout=timeout, device_id=device_id)
    _fake_cuda(monkeypatch, 1)
    monkeypatch.setattr(dist.td, "init_process_group", fake_init)
    monkeypatch.setattr(dist.td, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(dist, "_refuse_shared_gpus", lambda: calls.setdefault("checked", True))
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    dist.init("cuda")
    assert calls["timeout"].total_seconds() == 30 * 60  # rendezvous and first collective: ranks still loading
    assert calls["device_id"] == torch.device("cuda", 0) and calls["backend"] == "nccl" and calls["checked"]
    dist.init("cuda", timeout_min=90)
    assert calls["timeout"].total_seconds() == 90 * 60
    monkeypatch.setattr(dist, "_ENV", dist.DistEnv())


def test_shared_gpu_is_named(monkeypatch):
    class Props:
        name, uuid = "H200", "GPU-1234"
    monkeypatch.setattr(dist, "_ENV", dist.DistEnv(rank=0, world_size=2, host="node7"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    monkeypatch.setattr(dist.td, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, obj]))
    with pytest.raises(DistError, match=r"ranks \[0, 1\] on node7 all use GPU GPU-1234"):
        dist._refuse_shared_gpus()
    monkeypatch.setattr(dist, "_ENV", dist.DistEnv())


def test_settle_shortens_the_timeout_after_the_first_collective(monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist.td, "set_timeout", lambda t, group=None: seen.append(t), raising=False)
    dist.settle(10)
    assert seen and seen[0].total_seconds() == 600


def test_numerics_exact_turns_tf32_off_and_restores():
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    with dist.numerics(exact=True):
        assert not torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.deterministic
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    with dist.numerics(exact=False):
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before


def test_gloo_across_nodes_refuses_a_loopback_host_address(monkeypatch):
    env = dist.DistEnv(rank=1, world_size=2, local_world_size=1, master_addr="n1", host="n2")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(dist.socket, "gethostbyname", lambda name: "10.0.0.1" if name == "n1" else "127.0.1.1")
    with pytest.raises(DistError, match="GLOO_SOCKET_IFNAME"):
        dist._check_gloo_address(env)
    dist._check_gloo_address(dist.DistEnv(rank=1, world_size=2, master_addr="127.0.0.1"))  # all on this host
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    dist._check_gloo_address(env)  # the user chose the interface


@pytest.fixture
def cuda_forbidden(monkeypatch):
    """torch.cuda says a GPU is there, but initialising CUDA fails the test (an exclusive-process GPU, or ~0.5 GB of
    GPU 0 per rank): what a CPU run sees on a GPU node."""
    def boom(*args, **kwargs):
        raise AssertionError("CUDA was initialised by a CPU run")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_lazy_init", boom)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", boom)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", boom)
    monkeypatch.setattr(torch.cuda, "get_device_name", boom)
    monkeypatch.setattr(torch.cuda, "mem_get_info", boom)


@pytest.mark.slow
def test_cpu_runs_never_touch_cuda(cuda_forbidden, tmp_path, capsys):
    """--device cpu, or --gpus 0 with the default device: training, the array and the report never initialise
    CUDA, although torch.cuda reports a device (the debug cluster runs the jobs in this process)."""
    from hpcviz.commands import pipeline
    run = tmp_path / "cpu"
    args = ["--cluster", "debug", "--gpus", "0", "--run", str(run), "--data", "builtin:20", "--image-size", "16",
            "--arch", "resnet20", "--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--images", "4", "--tasks",
            "1", "--invert-steps", "5", "--featviz-steps", "2", "--report-images", "1", "--invert-images", "1"]
    assert pipeline.main(pipeline.get_args_parser().parse_args(args)) == 0, capsys.readouterr().err[-2000:]
    config = __import__("json").loads((run / "config.json").read_text())
    assert config["train"]["device"] == "cpu" and config["viz"]["device"] == "cpu"
    with dist.sync_allowed():  # the training loop's checks: no CUDA call on a CPU run
        pass
