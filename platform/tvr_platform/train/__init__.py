"""Ray Train (+ DeepSpeed) training service."""
