"""Static shapes for CUDA graphs: the padded layout changes nothing but the shapes; a task captures each shape
once, at most ceil(log2(images)) + 1 per set of blocks (counted on the CPU); captured graphs equal eager (GPU)."""
import copy
import math

import pytest
import torch

from hpcviz.explain.cuda_graphs import StepCache
from hpcviz.explain.inversion import InversionConfig, invert
from hpcviz.explain.rowopt import exact, pow2, shared_pow2
from hpcviz.models import build_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
BLOCKS = ["conv1", "layer1.2", "layer3.2"]


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=g) - 0.5) / 0.25


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model("resnet20", 10).eval()


def test_buckets():
    assert [pow2(n) for n in (0, 1, 2, 3, 5, 8, 9, 1000, 1024, 1025)] == [0, 1, 2, 4, 8, 8, 16, 1024, 1024, 2048]
    assert shared_pow2((3, 0, 17, 5)) == (32, 0, 32, 32) and exact((3, 0, 5)) == (3, 0, 5)


def test_padded_layout_gives_the_unpadded_result(net):
    net = copy.deepcopy(net).double()  # float64: batch sizes change the convolutions' rounding
    cfg = InversionConfig(steps=15, target=0.2, window=0)
    x = images(5, 1).double()
    plain = invert(net, images=x, blocks=BLOCKS, cfg=cfg, mean=MEAN, std=STD, cache=StepCache(pad="exact"))
    cache = StepCache(pad="pow2")
    padded = invert(net, images=x, blocks=BLOCKS, cfg=cfg, mean=MEAN, std=STD, cache=cache)
    assert ((8, 8, 8), "hard") in cache.steps  # 5 rows per block padded to 8 at first
    for b in BLOCKS:
        assert torch.equal(plain[b]["steps"], padded[b]["steps"])
        torch.testing.assert_close(plain[b]["x"], padded[b]["x"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain[b]["error"], padded[b]["error"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(plain[b]["loss"], padded[b]["loss"], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_a_task_captures_each_shape_once(net):
    cache = StepCache(pad="pow2")  # a GPU's layout; on the CPU `captured` counts what a GPU would capture
    cfg = InversionConfig(steps=40, target=0.03, window=20)
    n = 6
    run = lambda x: invert(net, images=x, blocks=BLOCKS, cfg=cfg, mean=MEAN, std=STD, cache=cache)  # noqa: E731
    first = run(images(n, 1))
    after_one = cache.captured
    assert after_one == len(cache.steps) >= 2
    run(images(n, 1))  # the same batch again: the same shapes, nothing captured
    assert cache.captured == after_one
    run(images(n, 2))
    run(images(3, 3))  # a task's smaller last batch
    per_set: dict[tuple[bool, ...], set[tuple[int, ...]]] = {}
    for key, _ in cache.steps:
        per_set.setdefault(tuple(k > 0 for k in key), set()).add(key)
    assert cache.captured == len(cache.steps)
    assert all(len(keys) <= math.ceil(math.log2(n)) + 1 for keys in per_set.values()), per_set
    assert all(k in (0, 1, 2, 4, 8) for key, _ in cache.steps for k in key)
    assert (first["conv1"]["steps"] < first["layer3.2"]["steps"]).any()  # rows left: the shape shrank


def test_the_cache_drops_its_steps_for_another_request(net):
    cache = StepCache(pad="pow2")
    cfg = InversionConfig(steps=10)
    invert(net, images=images(4, 1), blocks=BLOCKS, cfg=cfg, mean=MEAN, std=STD, cache=cache)
    kept = cache.objective
    invert(net, images=images(3, 2), blocks=BLOCKS, cfg=cfg, mean=MEAN, std=STD, cache=cache)
    assert cache.objective is kept  # a smaller batch fits
    invert(net, images=images(4, 1), blocks=["conv1"], cfg=cfg, mean=MEAN, std=STD, cache=cache)
    assert cache.objective is not kept and all(len(sizes) == 1 for sizes, _ in cache.steps)
    invert(net, images=images(9, 1), blocks=["conv1"], cfg=cfg, mean=MEAN, std=STD, cache=cache)
    assert cache.objective.capacity == 9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (the GPU check)")
def test_cuda_graphs_equal_eager_steps():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, "cifar").eval().cuda()
    x = ((torch.rand(20, 3, 32, 32) - 0.5) / 0.25).cuda()
    blocks = ["conv1", "layer2.1", "layer4.1"]
    cfg = InversionConfig(steps=40, precision="exact")
    cache = StepCache()
    graphed = invert(model, images=x, blocks=blocks, cfg=cfg, mean=MEAN, std=STD, cache=cache)
    eager = invert(model, images=x, blocks=blocks, cfg=InversionConfig(steps=40, precision="exact", graphs=False),
                   mean=MEAN, std=STD)
    for b in blocks:
        torch.testing.assert_close(graphed[b]["error"], eager[b]["error"], atol=2e-3, rtol=0.05)
        assert (graphed[b]["steps"] - eager[b]["steps"]).abs().max() <= 5
    assert cache.graphs and cache.captured == len(cache.steps) >= 1
    again = invert(model, images=x, blocks=blocks, cfg=cfg, mean=MEAN, std=STD, cache=cache)
    for b in blocks:  # replays of the captured shapes: the same result
        torch.testing.assert_close(again[b]["error"], graphed[b]["error"], atol=1e-4, rtol=1e-3)
