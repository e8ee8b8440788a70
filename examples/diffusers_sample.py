"""Sample a local SD3 or FLUX pipeline folder with flowdit's solvers and caches.

    python examples/diffusers_sample.py PATH --prompt "a red cube on a table" \
        --solver heun --steps 14 --cfg 5 --accel "fbcache:threshold=0.08" --out cube

is the same run as

    flowdit sample --diffusers PATH --prompt "a red cube on a table" \
        --solver heun --steps 14 --cfg 5 --accel "fbcache:threshold=0.08" --out cube

and goes through the same code (``flowdit.cli.sample_diffusers``): the pipeline's own text
encoders, time grid and VAE decoding, flowdit's integration. Every option of ``flowdit
sample --diffusers`` is passed through (``--size`` sets both ``--height`` and ``--width``);
the output folder gets the PNGs, a grid, ``latents.npz`` and ``settings.json``. PATH is a
folder written by ``pipeline.save_pretrained`` (or a downloaded model snapshot); nothing is
fetched from the network. It has not been run on real weights here (none can be downloaded
on the machines flowdit is tested on); ``tests/test_cli_diffusers.py`` runs the code path on
tiny random pipelines.
"""

from __future__ import annotations

import sys

from flowdit.cli import main as flowdit_main


def main(argv=None) -> int:
    """Run ``flowdit sample --diffusers`` with this script's arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: diffusers_sample.py PATH --prompt TEXT [flowdit sample options] --out DIR", file=sys.stderr)
        return 2
    path, rest = argv[0], argv[1:]
    if "--size" in rest:
        i = rest.index("--size")
        size = rest[i + 1] if i + 1 < len(rest) else ""
        rest = rest[:i] + ["--height", size, "--width", size] + rest[i + 2:]
    return flowdit_main(["sample", "--diffusers", path, *rest])


if __name__ == "__main__":
    sys.exit(main())
