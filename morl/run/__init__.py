"""One training run: building its parts once, collecting rollout batches, the step, checkpoints, the loop."""
