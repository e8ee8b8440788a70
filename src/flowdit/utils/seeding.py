"""Generators seeded by tuples of integers (a run's seed, a step, a sample index, ...)."""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose seed is a well-mixed hash of the integer ``key`` (NumPy's
    ``SeedSequence``), so nearby keys such as consecutive steps give unrelated streams."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g
