"""Fixtures shared by the test modules."""

import pytest
import torch

from flowdit.models.registry import build_model


@pytest.fixture(scope="module")
def tiny():
    """DiT-tiny on 8 x 8 one-channel images, 4 classes, with random weights: adaLN-Zero
    starts every block as the identity, so the weights are redrawn for attention to matter."""
    torch.manual_seed(0)
    model = build_model("DiT-tiny", 8, 1, 4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def batch():
    """Three images in [-1, 1], their source labels and edit targets."""
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 2]), torch.tensor([3, 3, 0])
