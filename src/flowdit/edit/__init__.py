"""Inversion and editing: RF-Solver / FireFlow inversion, RF-Edit feature sharing,
RF-Inversion's controlled ODEs, and FlowChef steering for inverse problems.

Layering: imports ``inference``, ``sampling``, ``models`` and ``core`` only.
"""

from flowdit.edit.flowchef import (
    RESTORE_METHODS,
    ClassifierGuidanceSolver,
    FlowChefSolver,
    ReplacementSolver,
    classifier_guided_sample,
    restore,
    restore_images,
)
from flowdit.edit.inversion import (
    invert,
    invert_images,
    inversion_grid,
    model_velocity,
    regenerate,
    regenerate_images,
    sampling_grid,
)
from flowdit.edit.operators import (
    TASKS,
    GaussianBlur,
    Inpaint,
    LinearOperator,
    SuperResolution,
    box_mask,
    build_operator,
    measure,
    random_mask,
)
from flowdit.edit.rf_edit import (
    EditResult,
    ValueSharing,
    default_edit_blocks,
    edit_blocks,
    rf_edit,
    value_sharing,
)
from flowdit.edit.rf_inversion import (
    RFInversionResult,
    controlled_forward_field,
    controlled_reverse_field,
    paper_forward_field,
    paper_reverse_field,
    rf_inversion,
)

__all__ = [
    "invert", "regenerate", "invert_images", "regenerate_images", "inversion_grid", "sampling_grid",
    "model_velocity", "rf_edit", "EditResult", "default_edit_blocks", "edit_blocks", "ValueSharing",
    "value_sharing", "rf_inversion", "RFInversionResult", "controlled_forward_field",
    "controlled_reverse_field", "paper_forward_field", "paper_reverse_field", "restore", "restore_images",
    "classifier_guided_sample", "FlowChefSolver", "ClassifierGuidanceSolver", "ReplacementSolver",
    "RESTORE_METHODS", "LinearOperator", "Inpaint", "SuperResolution", "GaussianBlur", "TASKS", "box_mask",
    "random_mask", "build_operator", "measure",
]
