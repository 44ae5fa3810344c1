"""The projections' memory: the model of one call against the peak a CPU run allocates, and batches of rows
sized from free memory by it."""
import pytest
import torch

from hpcviz.explain.dataset_examples import project, projection_footprint
from hpcviz.explain.deconv import Deconvnet
from hpcviz.models import build_model
from hpcviz.viz.projection import projection_batch

from conftest import peak_bytes


def measured_and_modelled(arch, stem, size, rows, block):
    torch.manual_seed(0)
    model = build_model(arch, 10, stem).eval()
    deconvnet = Deconvnet(model)
    x = torch.randn(rows, 3, size, size)
    channel, zero = torch.arange(rows) % 16, torch.zeros(rows, dtype=torch.long)
    peak = peak_bytes(lambda: project(deconvnet, x, block, channel, zero, zero))
    with torch.device("meta"):
        meta = build_model(arch, 10, stem).eval()
    fixed, per_row = projection_footprint(meta, block, (size, size))
    return peak, fixed + rows * per_row


@pytest.mark.parametrize("block", ["layer1.0", "layer3.2"])
def test_model_within_a_quarter_of_the_peak_resnet20_32px(block):
    peak, model = measured_and_modelled("resnet20", "cifar", 32, 16, block)
    assert 0.75 * peak <= model <= 1.25 * peak, (peak, model)


@pytest.mark.slow
@pytest.mark.parametrize("arch,size,rows,block", [("resnet18", 64, 4, "layer4.1"), ("resnet50", 224, 2, "layer2.3"),
                                                  ("resnet50", 224, 2, "layer4.2")])
def test_model_within_a_quarter_of_the_peak_imagenet_stem(arch, size, rows, block):
    peak, model = measured_and_modelled(arch, "imagenet", size, rows, block)
    assert 0.75 * peak <= model <= 1.25 * peak, (peak, model)


def test_rows_sized_from_free_memory():
    """The largest power of two of rows that fits half the free memory, at most 1024 on a GPU and 256 (and a GiB)
    on a CPU, at least 1; a faked 141 GB GPU takes ResNet-50 at 224 px in batches that fit."""
    state = {"config": {"arch": "resnet20", "stem": "cifar", "image_size": 32}, "classes": list(range(10))}
    with torch.device("meta"):
        meta = build_model("resnet20", 10, "cifar").eval()
    fixed, per_row = projection_footprint(meta, "layer3.2", (32, 32))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert projection_batch(state, "layer3.2", cpu, free_bytes=2 * (fixed + 20 * per_row)) == 16
    assert projection_batch(state, "layer3.2", cpu, free_bytes=1) == 1
    assert projection_batch(state, "layer3.2", cpu, free_bytes=10 ** 12) == 256
    assert projection_batch(state, "layer3.2", gpu, free_bytes=10 ** 12) == 1024
    big = {"config": {"arch": "resnet50", "stem": "imagenet", "image_size": 224}, "classes": list(range(1000))}
    with torch.device("meta"):
        r50 = build_model("resnet50", 1000, "imagenet").eval()
    fixed, per_row = projection_footprint(r50, "layer4.2", (224, 224))
    n = projection_batch(big, "layer4.2", gpu, free_bytes=141 * 10 ** 9)
    assert n & (n - 1) == 0 and fixed + n * per_row <= 0.5 * 141e9  # a power of two that fits
    assert n == 1024 or fixed + 2 * n * per_row > 0.5 * 141e9       # the largest, or the cap
    # a CPU call holds at most a GiB of rows, where its maps still mostly fit the caches: 32 of ResNet-18's at 224 px
    r18 = {"config": {"arch": "resnet18", "stem": "imagenet", "image_size": 224}, "classes": list(range(10))}
    with torch.device("meta"):
        _, per_row = projection_footprint(build_model("resnet18", 10, "imagenet").eval(), "layer4.1", (224, 224))
    assert projection_batch(r18, "layer4.1", cpu, free_bytes=10 ** 12) == 32 and 32 * per_row <= 2 ** 30 < 64 * per_row
    assert projection_batch(r18, "layer4.1", gpu, free_bytes=10 ** 12) == 1024  # a GPU's only bound is its memory


@pytest.mark.parametrize("arch,stem,size,tasks", [("resnet18", "cifar", 32, 100), ("resnet50", "imagenet", 224, 500),
                                                  ("resnet20", "cifar", 32, 3)])
def test_the_projection_parts_are_as_many_as_the_work_is_worth(arch, stem, size, tasks):
    """At most one per task of the first array, at least one per block, else the work in parts of _PART_MACS;
    every channel of every block exactly once."""
    from hpcviz.explain.dataset_examples import block_channels
    from hpcviz.models import block_names
    from hpcviz.viz import projection
    blocks = block_names(build_model(arch, 10, stem))
    parts = projection.projection_parts(arch, stem, blocks, tasks, 9, size)
    channels = block_channels(build_model(arch, 10, stem))
    for b in blocks:
        ranges = sorted((lo, hi) for blk, lo, hi in parts if blk == b)
        assert ranges[0][0] == 0 and ranges[-1][1] == channels[b] and all(
            r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    assert len(blocks) <= len(parts) <= max(tasks, len(blocks))
    if (arch, size) == ("resnet18", 32):
        assert len(parts) == len(blocks)  # 100 tasks, but the work of a few parts (it was one part per task)
    if arch == "resnet50":
        assert len(blocks) < len(parts) < tasks
    assert projection.projection_parts(arch, stem, blocks, tasks, 0, size) == []
