"""Stage 2 of the main path: stratified (grouped) K-fold files, `folds/<dataset>.csv`."""
