"""Load a trained model back from a run directory or checkpoint: :func:`flowdit.inference.load_run_model`,
re-exported here for code written against the earlier layout."""

from ..inference.loading import load_run_model

__all__ = ["load_run_model"]
