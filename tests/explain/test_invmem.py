"""The inversion's memory model against the peak a CPU run allocates, and batches sized from free memory.

The peak is measured with torch's profiler (profile_memory=True): it records every allocation and free of
c10's CPU allocator, which every tensor's storage goes through, with its size and time; the peak is the
largest running sum over the call, i.e. the most bytes the call held at once beyond what existed before
it (the model's own weights). What oneDNN allocates inside a kernel for itself is not seen (nor modelled).
"""
import pytest
import torch

from hpcviz.config import VizConfig
from hpcviz.explain.inversion import InversionConfig, invert
from hpcviz.explain.invmem import HEADROOM, batch_images, footprint
from hpcviz.models import build_model
from hpcviz.rundir import Plan
from hpcviz.viz.plan import resolve_invert_blocks
from hpcviz.viz.task import inversion_batch

from conftest import peak_bytes

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def measured_and_modelled(arch, size, n, blocks, steps, precision="exact"):
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    x = (torch.rand(n, 3, size, size) - 0.5) / 0.25
    cfg = InversionConfig(steps=steps, target=0, window=0, precision=precision)
    peak = peak_bytes(lambda: invert(model, images=x, blocks=blocks, cfg=cfg, mean=MEAN, std=STD))
    return peak, footprint(model, blocks, (size, size), steps, cfg.history, precision=precision).total(n)


def test_profiler_peak_by_hand():
    def f():
        a = torch.ones(1000, 1000)     # 4 MB
        b = a * 2                      # 8 MB held
        del a
        c = torch.ones(2000, 1000)     # b + c: 12 MB, the peak
        del b, c
    assert peak_bytes(f) == 12_000_000


@pytest.mark.parametrize("precision", ["exact", "bf16"])  # bf16: the GPU's default, autocast on the CPU
def test_model_within_a_quarter_of_the_peak_resnet20_32px(precision):
    peak, model = measured_and_modelled("resnet20", 32, 8, ["conv1", "layer1.2", "layer2.2", "layer3.2"], 3,
                                        precision)
    assert 0.75 * peak <= model <= 1.25 * peak, (peak, model)


@pytest.mark.slow
def test_model_within_a_quarter_of_the_peak_resnet50_224px():
    peak, model = measured_and_modelled("resnet50", 224, 1, ["conv1", "layer1.2", "layer2.3", "layer3.5",
                                                             "layer4.2"], 2)
    assert 0.75 * peak <= model <= 1.25 * peak, (peak, model)


def plan(blocks, **kw):
    return Plan(config=VizConfig(**kw), checkpoint="", checkpoint_sha256="", dataset_fingerprint="", split="val",
                blocks=[], deconv_blocks=[], paths=[], invert_blocks=blocks, invert_steps=0, invert_target=0.05,
                invert_solver="lbfgs", prior="tv", fast=False, shards=[[0]], n_images=1)


def test_batches_from_free_memory():
    model = build_model("resnet50", 10)
    blocks = resolve_invert_blocks(model, ["default"])
    gpu = torch.device("cuda")
    fp = footprint(model, blocks, (224, 224), 800, 20, precision="bf16", graphs=True)
    n = inversion_batch(plan(blocks), gpu, model, (224, 224), free_bytes=141 * 10 ** 9)
    assert n == batch_images(fp, 141 * 10 ** 9, most=1024) and n & (n - 1) == 0  # a power of two: no padding
    assert fp.total(n) <= HEADROOM * 141e9 < fp.total(2 * n)  # fits, and twice as many would not
    assert n < 1024  # what the constant was: its L-BFGS history alone, 123 GB, did not fit
    assert fp.per_image["layer4.2"] > 2 * 20 * 3 * 224 * 224 * 4  # at least its history
    small = inversion_batch(plan(blocks), gpu, model, (32, 32), free_bytes=141 * 10 ** 9)
    assert small == 1024  # 32 px: the cap
    assert inversion_batch(plan(blocks), gpu, model, (224, 224), free_bytes=10 ** 8) == 1  # at least one
    assert inversion_batch(plan(blocks, invert_batch_size=7), gpu, model, (224, 224), free_bytes=1) == 7
    assert inversion_batch(plan(blocks), torch.device("cpu"), model, (224, 224)) == 64
