"""The two small classifiers flowdit trains per data set, with different architectures.

* ``EvaluatorNet`` scores samples: its penultimate features define flowdit's FID,
  precision and recall, its predictions the class accuracy. Nothing may be trained or
  guided with it.
* ``GuideNet`` is the independent second network that losses (perceptual terms) and
  classifier guidance may use; its features also give a second FID, read only for
  models that were not trained or guided with it.

Both map images ``[B, C, H, W]`` in ``[-1, 1]`` to ``features [B, F]`` and ``logits [B, K]``.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class EvaluatorNet(nn.Module):
    """A VGG-style CNN: two 3x3 conv pairs with max-pooling, then a 128-d feature layer."""

    feature_dim = 128

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.fc = nn.Linear(2 * w * side * side, self.feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, 128]`` (after ReLU), the FID feature space."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class GuideNet(nn.Module):
    """A strided all-convolutional net with GELU and global average pooling (no max-pool,
    no dense bottleneck): a different inductive bias from ``EvaluatorNet``, so the two
    do not share failure modes."""

    feature_dim = 96

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, width: int = 48):
        super().__init__()
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, w, 5, padding=2), nn.GELU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, self.feature_dim, 3, stride=2 if image_size >= 16 else 1, padding=1), nn.GELU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally averaged last-conv activations ``[B, 96]``."""
        return self.conv(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


NETWORKS = {"evaluator": EvaluatorNet, "guide": GuideNet}
