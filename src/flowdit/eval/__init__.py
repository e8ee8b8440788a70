"""Evaluation metrics: distribution distances between feature sets (FID, improved
precision and recall) and full-reference pixel metrics (PSNR, SSIM).

The reference digit classifier lives in :mod:`flowdit.eval.classifier`; it is not
imported here so that using the metrics does not import scikit-learn.
"""

from .fid import feature_statistics, fid_from_features, frechet_distance
from .pixel import psnr, ssim
from .prdc import precision_recall

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "precision_recall",
    "psnr",
    "ssim",
]
