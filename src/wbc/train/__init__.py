"""Fold training: losses, samplers and the training loop."""
