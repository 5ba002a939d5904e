"""Stage 6 of the main path, biological refinement: classical cell / nucleus morphology, per-class Mahalanobis
models and a rare-class rescue rule (hard gates or a soft likelihood term) fitted on out-of-fold predictions.
See docs/refine.md."""
from .gaussian import ClassGaussians, FeatureScaler, crossfit
from .morphology import FEATURES, SegParams, analyse, count_lobes, extract_features, segment, shape_features
from .rule import Evidence, apply_hard, fit_hard, fit_soft, nested, soft_probs

__all__ = ["ClassGaussians", "FeatureScaler", "crossfit", "FEATURES", "SegParams", "analyse", "count_lobes",
           "extract_features", "segment", "shape_features", "Evidence", "apply_hard", "fit_hard", "fit_soft",
           "nested", "soft_probs"]
