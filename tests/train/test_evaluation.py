import json

import pytest
import torch

from hpcviz.models import build_model
from hpcviz.train.evaluation import autocast_for, evaluate, remap_labels, summarize

from conftest import run_job


def test_evaluate_matches_a_hand_count():
    torch.manual_seed(0)
    model = build_model("resnet20", 3).eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (11, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    from hpcviz.data.placement import feed_tensors
    res = evaluate(model, feed_tensors(images, labels, torch.device("cpu")), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 3,
                   batch_size=4)
    x = (images.float() / 255 - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model(x).argmax(1)
    hand = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(labels.tolist(), pred.tolist()):
        hand[t, p] += 1
    assert torch.equal(res["confusion"], hand) and res["n"] == 11
    assert res["accuracy"] == pytest.approx((pred == labels).float().mean().item())
    s = summarize(res, ["a", "b", "c"])
    assert s["per_class_n"] == [4, 4, 3]
    assert s["per_class_accuracy"]["c"] == pytest.approx(float(hand[2, 2]) / 3)


def test_remap_labels_by_name():
    labels = torch.tensor([0, 1, 1, 0])
    assert remap_labels(labels, ["dog", "cat"], ["cat", "bird", "dog"]).tolist() == [2, 0, 0, 2]
    with pytest.raises(ValueError, match="classes the model does not know: fish"):
        remap_labels(labels, ["dog", "fish"], ["cat", "dog"])


def test_autocast_is_fp32_on_cpu_by_default():
    with autocast_for(torch.device("cpu"), "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.slow
def test_evaluate_job_writes_eval_json(tmp_path, tiny_cfg):
    from hpcviz.train.loop import train
    cfg = tiny_cfg(epochs=1)
    train(cfg)
    r = run_job("evaluate.py", "--run", cfg.run_dir, "--data", "builtin:5", "--name", "extra", timeout=120)
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "run" / "eval-extra.json").read_text())
    assert ev["n"] == 50 and sum(map(sum, ev["confusion"])) == 50 and ev["split"] == "extra"
    bad = run_job("evaluate.py", "--run", cfg.run_dir, "--data", tmp_path / "nope", timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no such directory" in bad.stderr


def test_amp_auto_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    """V100/T4: torch.cuda.is_bf16_supported() is True by default (it counts emulation), and slow."""
    from contextlib import nullcontext

    def supported(including_emulation: bool = True) -> bool:
        return including_emulation  # an emulating GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    cuda = torch.device("cuda", 0)
    assert isinstance(autocast_for(cuda, "auto"), nullcontext)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere+
    assert isinstance(autocast_for(cuda, "auto"), torch.autocast)
    assert isinstance(autocast_for(cuda, "off"), nullcontext)
