import pytest

from hpcviz.config import ConfigError, TrainConfig, config_from_dict, config_to_dict, make_train_config


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
