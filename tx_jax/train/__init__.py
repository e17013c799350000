"""Training: state, optimizer, pure train/eval steps, checkpoints, metrics, loop."""
