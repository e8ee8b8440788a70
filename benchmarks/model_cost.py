"""Parameters and forward FLOPs per image of registered models at one input shape, counted
by ``torch.utils.flop_counter`` (matrix products and convolutions, 2 FLOPs per multiply-add;
attention's products included), for comparing architectures at equal parameters or FLOPs.

    python benchmarks/model_cost.py --models DiT-mnist DDT-mnist DiCo-mnist DiCo-mnist-F --size 28 --channels 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import finish, markdown_table  # noqa: E402

from flowdit.models import build_model  # noqa: E402


def forward_flops(model: torch.nn.Module, size: int, channels: int) -> int:
    """FLOPs of one forward pass on one ``[1, channels, size, size]`` image."""
    x, t, y = torch.randn(1, channels, size, size), torch.rand(1), torch.tensor([0])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["DiT-mnist", "DDT-mnist", "DiCo-mnist", "DiCo-mnist-F"])
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--name", default="model_cost_mnist")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    rows, out = [], []
    base = None
    for name in args.models:
        m = build_model(name, args.size, args.channels, args.classes).eval()
        n, f = m.param_count(), forward_flops(m, args.size, args.channels)
        base = base or (n, f)
        out.append({"model": name, "params": n, "forward_flops": f})
        rows.append(f"| {name} | {n / 1e6:.3f} | {n / base[0]:.2f} | {f / 1e6:.1f} | {f / base[1]:.2f} |")
    table = markdown_table(f"| model | parameters (M) | vs {args.models[0]} | forward MFLOPs / image | vs {args.models[0]} |",
                           rows)
    finish(args.name, "model_cost.py", argv, {"rows": out, "size": args.size, "channels": args.channels}, table,
           write=not args.no_write)


if __name__ == "__main__":
    main()
