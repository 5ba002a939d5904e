"""Predictions: TTA views, per-fold OOF / eval / test probabilities, fold merging."""
