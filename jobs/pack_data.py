"""Pack an image set into one HDF5 file: `python jobs/pack_data.py --data DIR --image-size 32 --out data/cifar10-train.h5`

Decodes an image set once (ImageFolder, CIFAR-10 batches, builtin, or a packed file to repack or resize)
and writes it as one packed HDF5 file, so training jobs load it in a second, or stream its rows, instead
of decoding 50,000 JPEGs on every rank. It streams (~64 MB at a time), checks the space first and writes
atomically: an interrupted or refused run never leaves a partial --out.
"""
from hpcviz.commands.pack import get_args_parser, main

if __name__ == "__main__":
    raise SystemExit(main(get_args_parser(add_help=True).parse_args()))
