"""python jobs/inspect_results.py results/<run> | FILE.h5 [DATASET [--index I] [--png OUT.png]]
python jobs/inspect_results.py results/<run> --block layer4.1 --channel 17 [--png OUT.png]

What is in a run, an HDF5 file or one dataset, without dumping data:
  results/<run>                  stages and their status, accuracy, visualization shards present/missing
  FILE.h5                        tree: shapes, dtypes, chunks, filters, dimension labels, key attrs
  FILE.h5 DATASET [--index I]    min, max, mean, std, NaN/inf/zero counts of the dataset (or of image I)
  ... --png OUT.png              images, deconv/*, invert/* as RGB images; act/* as a feature-map grid
  RUN --block B --channel C      channel C's dataset examples: its top-k images (activation, image, class,
                                 position); --png OUT.png draws their patches and projections
Bad input (not HDF5, truncated, unknown dataset, index out of range) is one `error:` line, exit 2.
"""
from hpcviz.commands.inspect import get_args_parser, main

if __name__ == "__main__":
    raise SystemExit(main(get_args_parser(add_help=True).parse_args()))
