"""Text encoders: paraphrase similarity of the pooled vectors and encode speed on this machine.

    python benchmarks/text_encoder.py [--encoders minilm,minilm-bf16,hash] [--repeats 3] [--captions 1000]

For each encoder: the cosine similarities of the pooled vectors of a few prompt pairs
(paraphrases and unrelated prompts), and the time to encode ``--captions`` distinct
template captions ("a small red circle to the left of a large blue star") in batches of
``--batch``, median of ``--repeats`` runs after a warm-up, plus the time to read the same
captions back from :func:`flowdit.models.text_encoder.encode_cached`. Runs with the torch
threads it is given (set ``OMP_NUM_THREADS``).

Writes ``benchmarks/results/text_encoder.{json,md}`` (``--name`` to change).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile

import torch

from common import machine_info, timed, write_results
from flowdit.models.text_encoder import HashEncoder, MiniLMEncoder, encode_cached

PAIRS = [
    ("a red circle left of a blue star", "a blue star to the right of a red circle", "paraphrase"),
    ("a small green square above a large yellow triangle",
     "a large yellow triangle below a small green square", "paraphrase"),
    ("a red circle left of a blue star", "a green square above a yellow triangle", "unrelated scene"),
    ("a red circle left of a blue star", "a blue circle left of a red star", "colours swapped"),
    ("a red circle left of a blue star", "the weather is nice today", "unrelated text"),
    ("a red circle left of a blue star", "", "empty prompt"),
]

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]
RELATIONS = ["to the left of", "to the right of", "above", "below"]


def captions(n: int) -> list[str]:
    """``n`` distinct two-object template captions."""
    out = []
    for s1, c1, r, c2, s2, z1, z2 in itertools.product(SHAPES, COLOURS, RELATIONS, COLOURS, SHAPES,
                                                       ("small", "large"), ("small", "large")):
        out.append(f"a {z1} {c1} {s1} {r} a {z2} {c2} {s2}")
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} captions")


def build(name: str):
    if name == "minilm":
        return MiniLMEncoder()
    if name == "minilm-bf16":
        return MiniLMEncoder(dtype=torch.bfloat16)
    if name == "hash":
        return HashEncoder()
    raise SystemExit(f"unknown encoder {name!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", default="minilm,minilm-bf16,hash")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--captions", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--name", default="text_encoder")
    args = ap.parse_args(argv)
    caps = captions(args.captions)
    rows, payload = [], {"machine": machine_info(), "torch_threads": torch.get_num_threads(),
                         "captions": args.captions, "batch": args.batch, "repeats": args.repeats, "encoders": {}}
    for name in args.encoders.split(","):
        enc = build(name)
        pooled = enc.encode([p for a, b, _ in PAIRS for p in (a, b)])["pooled"]
        sims = [float(pooled[2 * i] @ pooled[2 * i + 1]) for i in range(len(PAIRS))]

        def run():
            for i in range(0, len(caps), args.batch):
                enc.encode(caps[i:i + args.batch])

        times = timed(run, repeats=args.repeats, warmup=1)
        with tempfile.TemporaryDirectory() as d:
            encode_cached(enc, caps, d, batch_size=args.batch)
            cached = timed(lambda: encode_cached(enc, caps, d), repeats=args.repeats, warmup=1)
        per_1000 = statistics.median(times) * 1000 / len(caps)
        read_1000 = statistics.median(cached) * 1000 / len(caps)
        payload["encoders"][name] = {"identity": enc.identity, "similarities": sims, "encode_s": times,
                                     "encode_s_per_1000": per_1000, "cache_read_s": cached,
                                     "cache_read_s_per_1000": read_1000}
        rows.append((name, sims, per_1000, read_1000))
        print(name, [f"{s:.3f}" for s in sims], f"{per_1000:.2f} s / 1000 captions", flush=True)

    head = "| pair | kind | " + " | ".join(r[0] for r in rows) + " |"
    lines = [head, "|" + " --- |" * (2 + len(rows))]
    for i, (a, b, kind) in enumerate(PAIRS):
        lines.append(f"| \"{a}\" vs \"{b}\" | {kind} | " + " | ".join(f"{r[1][i]:.3f}" for r in rows) + " |")
    lines.append(f"| encode {args.captions} captions, batch {args.batch} (s per 1000, median of {args.repeats}) | | "
                 + " | ".join(f"{r[2]:.2f}" for r in rows) + " |")
    lines.append("| read them back from the cache (s per 1000) | | " + " | ".join(f"{r[3]:.3f}" for r in rows) + " |")
    m = payload["machine"]
    table = (f"Machine: {m.get('cpu', m)}; {payload['torch_threads']} torch thread(s).\n\n" + "\n".join(lines) + "\n")
    print(write_results(args.name, payload, table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
