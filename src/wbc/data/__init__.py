"""Data: the WBCBench layout, a synthetic sample dataset, image cache, augmentation, damage, stain."""
