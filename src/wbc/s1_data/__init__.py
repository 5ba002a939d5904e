"""Stage 1 of the main path: the WBCBench layout and its submission format, a synthetic sample dataset, the image
cache, augmentation and the damage simulator."""
