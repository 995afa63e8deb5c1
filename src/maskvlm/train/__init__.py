"""Training machinery: the loop, optimiser and schedule, checkpoints, logging, distributed helpers."""
