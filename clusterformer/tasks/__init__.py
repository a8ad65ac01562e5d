"""Tasks: targets, losses and post-processing, one module per task (imports ops and models)."""
