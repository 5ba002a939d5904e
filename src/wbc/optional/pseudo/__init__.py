"""Pseudo-labels: an ensemble's confident predictions on unlabelled splits, as extra training rows."""
