"""The step context the sampling loop hands to the model (defined in ``flowdit.core.hooks``,
below the models that call its hooks; re-exported here where the loop uses it)."""

from __future__ import annotations

from flowdit.core.hooks import CFG_MODES, HOOK_POINTS, BlockPolicy, Hook, HookList, StepContext

__all__ = ["BlockPolicy", "StepContext", "Hook", "HookList", "CFG_MODES", "HOOK_POINTS"]
