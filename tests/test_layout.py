"""The package layers: core -> models -> sampling -> inference -> methods -> train / bench / interop -> cli.

A subpackage imports only subpackages of lower layers (at any depth, lazy imports
included), so that, for example, loading a model never pulls in the trainer.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Lower number = lower layer. The foundation (layer 0) may use itself freely.
LAYERS = {
    "errors": 0, "utils": 0, "data": 0, "checkpoint_io": 0, "__version__": 0,
    "core": 1,
    "models": 2,
    "sampling": 3,
    "inference": 4,
    "accel": 5, "edit": 5, "distill": 5, "eval": 5, "evaluate": 5, "compress": 5,
    # Adapters of other libraries' models to flowdit's sampling loop and block policies.
    "train": 6, "bench": 6, "interop": 6,
    "cli": 7,
}
# Same-layer imports that are part of the design: scoring samples uses the networks.
ALLOWED = {("evaluate", "eval")}


def _imports(path: Path) -> set[str]:
    """The top-level flowdit subpackages (or modules) that ``path`` imports."""
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts if is_pkg else parts[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] != "flowdit":
                continue
            if len(target) == 1:  # "from flowdit import X" / "from .. import X"
                out.update(a.name for a in node.names)
            else:
                out.add(target[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("flowdit."))
    return out


def test_every_subpackage_imports_only_lower_layers():
    bad = []
    for path in sorted((SRC / "flowdit").rglob("*.py")):
        rel = path.relative_to(SRC / "flowdit")
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if own == "__init__":
            continue
        assert own in LAYERS, f"{rel}: subpackage {own!r} has no layer in tests/test_layout.py"
        for dst in _imports(path) - {own}:
            assert dst in LAYERS, f"{rel}: imports {dst!r}, which has no layer"
            if LAYERS[dst] > LAYERS[own] or (LAYERS[dst] == LAYERS[own] > 0 and (own, dst) not in ALLOWED):
                bad.append(f"{rel} ({own}, layer {LAYERS[own]}) imports {dst} (layer {LAYERS[dst]})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_nothing_below_the_command_line_imports_the_trainer():
    users = sorted(str(p.relative_to(SRC / "flowdit")) for p in (SRC / "flowdit").rglob("*.py")
                   if "train" in _imports(p) and p.relative_to(SRC / "flowdit").parts[0] not in ("train", "cli"))
    assert users == []
