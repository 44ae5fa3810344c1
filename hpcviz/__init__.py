"""hpcviz: train a ResNet with DDP on SLURM, then explain it at scale."""

__version__ = "0.1.0"
