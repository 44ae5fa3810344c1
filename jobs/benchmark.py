"""Benchmarks, each a ratio against a baseline measured in the same run: `python jobs/benchmark.py train --device cpu`

  train   images/s of the project's training step vs a plain eager fp32 DataLoader loop
          (same data, model, batch), then with --to-accuracy the epochs and minutes until
          validation accuracy reaches --target (81.89%, the course report's figure).
  invert  images/s of a batched inversion vs one image at a time, and the median relative
          feature error per block (a trained ResNet-20 by default).
  deconv  ms/image of every block x 3 deconvnet paths vs a Captum-style baseline (a full
          forward + backward per block and path), and their largest relative difference.
  dump    MB/s of the HDF5 shard writer vs writing the same bytes raw with fsync, for each
          compression offered, and the bytes per image per block of ResNet-18 (both stems)
          and ResNet-20.
  placement  training images/s of the host and stream data placements vs device-resident, and the
          peak memory of a 2-process CPU job with each, against the packed file's size.
  viz     the whole array task per image (load, forward, deconvnet, inversion, write) and the median
          inversion error per block, on held-out images of a trained run (--run): the default vs
          today's way (each task loads the whole split, 1000 Adam steps per inversion, no stopping).
  examples  the dataset examples at scale (ResNet-18 CIFAR stem, 10,000 images, k = 9, untrained weights):
          an array task's time without and with the per-channel top-k map, the merge's time, the
          projections' seconds per channel, and the merged lists against a brute-force top-k.
  gpu     the GPU check: `pytest -m gpu`, then train (ResNet-18, 32 px, both stems), dump, deconv,
          invert and the whole visualization stage on CUDA; a table and results/benchmarks/gpu.json.

Every benchmark takes --device (auto = CUDA where there is one) and compares like with like on it.

--data auto uses ../shared/data/cifar10-train-jpeg.tar.gz when it exists (unpacked and packed
once into data/cifar10-train.h5), else the built-in set. Results go to results/benchmarks/.
"""
from hpcviz.commands.benchmark import get_args_parser, main

if __name__ == "__main__":
    raise SystemExit(main(get_args_parser(add_help=True).parse_args()))
