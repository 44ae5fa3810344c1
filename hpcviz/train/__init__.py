"""Training: the loop, the submitted job, evaluation, checkpoints, importing weights."""
