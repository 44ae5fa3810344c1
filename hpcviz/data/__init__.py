"""Data: the sources (--data), transforms, placement on devices, packing."""
