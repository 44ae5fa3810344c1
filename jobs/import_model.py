"""Bring your own ResNet: `python jobs/import_model.py --weights FILE --arch resnet50 --data SOURCE --run DIR`

Makes a run directory from a torchvision-layout state dict, with no training: the classes and the
validation split come from --data, carved exactly as training would; the checkpoint, config.json,
manifest.json (train: done, imported from FILE, with its sha256) and eval.json are those of a trained
run, so jobs/launch_viz.py, aggregate.py, evaluate.py and inspect_results.py work on it unchanged.
Inputs are normalised with ImageNet's mean/std unless --normalize data|custom.
Exit code: 0 done, 1 failed, 2 bad input (nothing written).
"""
from hpcviz.commands.importing import get_args_parser, main

if __name__ == "__main__":
    raise SystemExit(main(get_args_parser(add_help=True).parse_args()))
