"""Test-shift-aware validation: how a run would score on a split damaged differently from the training pool.

The test split of a WBCBench-style challenge is damaged more heavily than the labelled ones, so plain out-of-fold
(OOF) macro-F1 answers for the wrong mix of images. This step measures every image's damage features, trains a
domain classifier (labelled pool vs target split) on them, and re-weights the labelled images by the density
ratio p_target / p_pool (covariate-shift importance weighting): the weighted OOF macro-F1 estimates the score on
the target's mix of damage. `make shift` writes the weights and a report over runs.
"""
