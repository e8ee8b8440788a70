"""Wall-clock timing for the benchmarks: device synchronisation, repeated calls, and
measurements that take turns batch by batch so that machine noise falls on all alike."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

__all__ = ["measure_interleaved", "sync", "timed"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def measure_interleaved(plans: Sequence[Any], labels: torch.Tensor, batch_size: int, device: torch.device,
                        sample: Callable[[Any, torch.Tensor, int], Any]) -> dict[str, dict]:
    """Sample ``labels [N]`` with every measurement in ``plans``, taking turns batch by batch.

    ``sample(plan, batch_labels, first_index)`` draws one batch (a ``Generated``: images,
    nfe) with ``plan.policy``; the measurements run each batch in alternating order, so a
    slow or fast spell of a shared machine falls on every measurement alike instead of on
    whichever ran during it. Returns, per ``plan.name``: ``seconds`` (summed), ``images
    [N, C, H, W]``, ``nfe``, the policy's cache bytes (``state``), peak CUDA memory
    (``peak``) and counts (``flops``, ``calls``, ``full_calls``).
    """
    parts = {p.name: {"seconds": 0.0, "images": [], "nfe": 0, "state": 0, "peak": 0} for p in plans}
    for p in plans:
        p.policy.reset_stats()
    for b, lo in enumerate(range(0, len(labels), batch_size)):
        batch = labels[lo:lo + batch_size]
        for p in plans if b % 2 == 0 else plans[::-1]:
            part = parts[p.name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            gen = sample(p, batch, lo)
            sync(device)
            part["seconds"] += time.perf_counter() - t0
            if device.type == "cuda":
                part["peak"] = max(part["peak"], torch.cuda.max_memory_allocated(device))
            part["images"].append(gen.images)
            part["nfe"] = max(part["nfe"], gen.nfe)
            part["state"] = max(part["state"], p.policy.state_bytes())
    for p in plans:
        part = parts[p.name]
        part["images"] = torch.cat(part["images"])
        st = p.policy.stats
        part.update(flops=st.flops, calls=st.calls, full_calls=st.full_calls)
    return parts
