"""Stage 4 of the main path: a fold model's OOF / eval / test probabilities with TTA, fold merging, `classify`."""
