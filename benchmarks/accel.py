"""Training-free acceleration benchmark; the same as ``flowdit bench accel``.

    python benchmarks/accel.py --run runs/mnist --num 1000 --seeds 0,1,2

See ``flowdit.bench.accel`` for what is measured and ``docs/acceleration.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowdit.bench.accel import add_arguments, check, run

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.set_defaults(out_dir=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    check(args)
    run(args)
