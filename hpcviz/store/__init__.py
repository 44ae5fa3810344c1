"""HDF5 storage for hpcviz: the packed image set, the per-task shards, their virtual view, what a file holds.

This package is the only code that imports h5py. Every writer goes through a temp file that is
renamed onto the final name only when complete, so a crash or a SLURM time-out never leaves
a half-written file under the final name: readers see the previous complete file or the new one.

Packed layout (format ``hpcviz-packed-v1``)::

    /images   (N, 3, H, W) uint8, contiguous, uncompressed (fast to load whole, and PackedReader reads
              rows by file offset); files from before are chunked by 256 images and still read
    /labels   (N,) int64
    root attrs: format, classes (JSON list of str), n, image_size (H if square, else 0),
                height, width, plus any caller attrs (source spec, fingerprint, created, ...)

Shards (``hpcviz-shard-v1``, one per array task, written by `ShardWriter`) and their virtual
view viz.h5 (``hpcviz-viz-v1``, written by `write_view`) share the layout of docs/visualization.md ("The HDF5
layout").
Attributes: scalars and flat lists of str/numbers are stored natively (h5dump shows them); other
values (dicts, nested lists) as JSON strings whose names are listed in the attr ``json_attrs``.

Modules: _common (StoreError, atomic_path, attribute encoding, opening with clear errors, open_checked), packed
(write_packed, PackedWriter, read_packed, PackedReader), shards (ShardWriter, verify_shard, read_shard, read_summaries,
list_datasets, read_attrs), virtual (write_view: the virtual view, write_arrays) and contents (describe, dataset_stats,
read_image: what a file holds). Import from hpcviz.store; patch module-level settings (e.g. contents._STATS_ELEMS) in
the submodule that uses them.
"""
from __future__ import annotations

from ._common import StoreError, atomic_path, open_checked
from .contents import dataset_stats, describe, read_image
from .packed import PACKED_FORMAT, PackedReader, PackedWriter, fingerprint_blocks, read_packed, write_packed
from .shards import (
           COMPRESSIONS,
           SHARD_FORMAT,
           BackgroundWriter,
           ShardWriter,
           list_datasets,
           read_attrs,
           read_shard,
           read_summaries,
           verify_shard,
)
from .virtual import AGREE_ATTRS, VIZ_FORMAT, write_arrays, write_view

__all__ = ["StoreError", "PACKED_FORMAT", "write_packed", "read_packed", "PackedWriter", "PackedReader",
           "fingerprint_blocks", "AGREE_ATTRS", "COMPRESSIONS", "BackgroundWriter",
           "atomic_path", "SHARD_FORMAT", "VIZ_FORMAT", "ShardWriter", "verify_shard", "read_shard",
           "list_datasets", "read_attrs", "read_summaries", "write_view", "write_arrays", "describe", "dataset_stats",
           "read_image", "open_checked"]
