"""Launching: submitit executors and profiles, the pipeline's job graph."""
