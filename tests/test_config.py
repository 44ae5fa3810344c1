import dataclasses

import pytest

from hpcviz.config import ConfigError, TrainConfig, VizConfig, config_from_dict, config_to_dict, make_train_config


def test_recipe_then_flags():
    seed = make_train_config({}, "seed")
    assert (seed.lr, seed.batch_size, seed.epochs, seed.momentum, seed.schedule) == (0.0005, 256, 900, 0.9, "constant")
    assert (seed.arch, seed.resolved_stem(), seed.weight_decay) == ("resnet18", "imagenet", 0.0)
    assert make_train_config({"epochs": 3, "lr": None}, "seed").epochs == 3
    assert make_train_config({"lr": None}).lr == TrainConfig().lr


def test_round_trip_and_unknown_fields():
    cfg = make_train_config({"arch": "resnet20"})
    assert config_from_dict(TrainConfig, config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown TrainConfig fields \\['btach_size'\\]"):
        config_from_dict(TrainConfig, {"btach_size": 3})


@pytest.mark.parametrize("field,value,message", [
    ("arch", "vgg", "--arch 'vgg': not one of resnet18"), ("schedule", "step", "--schedule 'step'"),
    ("epochs", 0, "--epochs 0"), ("val_fraction", 1.0, "--val-fraction 1.0"), ("device", "tpu", "--device 'tpu'"),
])
def test_validation_messages(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make_train_config({field: value})
    with pytest.raises(ConfigError, match="--recipe 'fast'"):
        make_train_config({}, "fast")


def test_default_stems():
    assert TrainConfig(arch="resnet56").resolved_stem() == "cifar"
    assert TrainConfig(arch="resnet50").resolved_stem() == "imagenet"
    assert TrainConfig(arch="resnet50", stem="cifar").resolved_stem() == "cifar"


def test_tasks_are_sized_by_their_work():
    """Without --tasks or --per-task: 100 images per CPU task; a GPU task holds the work of 1024 images of
    32 px (fewer for larger images, at least 16); the request records the size it was split by."""
    from hpcviz.config import VizConfig, default_per_task
    assert default_per_task(False, 224) == 100
    assert [default_per_task(True, s) for s in (32, 64, 224, 1024)] == [1024, 256, 20, 16]
    cfg = VizConfig(images=5000)
    assert cfg.n_tasks() == 50 and cfg.n_tasks(gpu=True) == 5 and cfg.n_tasks(gpu=True, image_size=224) == 250
    assert VizConfig(images=5000, per_task=500).n_tasks(gpu=True) == 10  # --per-task wins
    assert VizConfig(images=5000, tasks=3).n_tasks(gpu=True) == 3        # --tasks wins
    assert VizConfig(images=8).n_tasks() == 1
    sized = cfg.sized(gpu=True, image_size=64)
    assert sized.per_task == 256 and sized.n_tasks() == 20  # planned again anywhere, the same split
    assert VizConfig(per_task=7).sized(gpu=True, image_size=32).per_task == 7


def test_featviz_blocks_auto_is_all_but_none_in_a_local_run_on_cpus():
    cfg = VizConfig(run_dir="r")
    assert cfg.featviz_blocks == ["auto"]
    assert cfg.featviz_here("local").featviz_blocks == ["all"]  # device auto: the job's is not known to be a CPU
    cpu = dataclasses.replace(cfg, device="cpu")
    assert cpu.featviz_here("local").featviz_blocks == [] and cpu.featviz_here("debug").featviz_blocks == []
    assert cpu.featviz_here("slurm").featviz_blocks == ["all"]  # an array spreads it over the nodes
    assert dataclasses.replace(cfg, device="cuda").featviz_here("local").featviz_blocks == ["all"]
    for asked in (["all"], [], ["layer1.0"]):  # what the user asked for is kept
        assert dataclasses.replace(cpu, featviz_blocks=asked).featviz_here("local").featviz_blocks == asked
