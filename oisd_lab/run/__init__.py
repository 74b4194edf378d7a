"""A run's housekeeping around the algorithm: its folder, starting it, tracking, checkpoints,
the Lightning Trainer, and held-out evaluation.

This file imports nothing, so that the torch-free `run.folder` can be read on its own (by the
grid runner, `collect` and `analysis`).
"""
