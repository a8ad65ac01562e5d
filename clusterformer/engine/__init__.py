"""Training and evaluation loops, distributed setup, checkpoints, logging."""
