"""Pack an image set into one HDF5 file (jobs/pack_data.py), so training jobs load it in a second."""
from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

from ..cli import Parser, add_options, command, given
from ..config import PackConfig, config_from_dict
from ..errors import InputError
from ..log import setup_logging
from ..report.render import terminal_text  # class names from --data: shown as written, never as terminal codes


def get_args_parser(add_help: bool = False) -> Parser:
    p = Parser("pack_data.py", add_help=add_help, description="Pack an image set into one HDF5 file.")
    add_options(p, PackConfig, title="packing", required=("data", "out"))
    return p


@command
def main(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = config_from_dict(PackConfig, given(args, PackConfig)).validate()
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise InputError(f"--out {out} already exists; hint: pass --force to overwrite it or choose another --out")
    start = time.perf_counter()
    attrs: dict[str, str | int | float] = {"source": cfg.data, "seed": cfg.seed,
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    from ..data import packing  # torch: once the options are known to be good
    packing.check_request(cfg)
    src = packing.open_source(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    n, height, width, _fingerprint = packing.pack(src, out, attrs)
    mb = os.path.getsize(out) / 2 ** 20
    print(f"wrote {out}: {n} images, {len(src.classes)} classes ({terminal_text(', '.join(src.classes))}), "
          f"{height}x{width}, {mb:.1f} MB, {time.perf_counter() - start:.1f} s")
    return 0
