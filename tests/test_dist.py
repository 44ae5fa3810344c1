import os

import pytest
import torch
import torch.multiprocessing as mp

from hpcviz import dist
from hpcviz.dist import DistError, first_host, port_for_job, read_env


@pytest.mark.parametrize("nodelist,first", [("gpu[07-09,12]", "gpu07"), ("node1,node2", "node1"),
                                            ("a-b[1-2],c[3]", "a-b1"), ("localhost", "localhost"),
                                            ("n[001]", "n001")])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_read_env_sources_and_precedence():
    assert read_env({}).source == "single" and read_env({}).world_size == 1
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[10-11]",
             "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "2"}
    e = read_env(slurm)
    assert (e.source, e.rank, e.local_rank, e.world_size, e.master_addr, e.local_world_size) == \
           ("slurm", 3, 1, 4, "gpu10", 2)
    assert e.master_port == port_for_job("123456") == 20000 + 123456 % 40000
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
    with pytest.raises(DistError, match="outside world size"):
        dist.init("cpu")


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from hpcviz.evaluate import evaluate
    from hpcviz.models import build_model
    dist.init("cpu", timeout_s=60)
    try:
        torch.manual_seed(0)
        model = build_model("resnet20", 4)
        g = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (13, 3, 8, 8), dtype=torch.uint8, generator=g)  # 13: uneven over 2 ranks
        labels = torch.randint(0, 4, (13,), generator=g)
        res = evaluate(model, images, labels, (0.5,) * 3, (0.25,) * 3, 4, batch_size=4)
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
