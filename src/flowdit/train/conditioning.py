"""What a training step conditions the model on: class labels, or captions through a text
encoder. The trainer asks its conditioning for the batch's condition and knows neither.

* :class:`ClassConditioning`: the data set's labels; a dropped one becomes the model's
  null class (classifier-free guidance, Ho & Salimans 2022).
* :class:`TextConditioning`: every caption of every item is encoded once
  (:func:`flowdit.models.text_encoder.encode_cached`, cached on disk); at each step one of
  an item's captions (its paraphrases) is drawn at random, and a dropped item gets the
  empty prompt's encoding, the null condition of SD3 (Esser et al. 2024, sec. 3 and B.3)
  and of the text-to-image models after it.

Both draw from their own seeded stream for the whole global batch, so a step's
conditions do not depend on the number of processes or on resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..utils.seeding import seeded_generator

__all__ = ["TextBatch", "ClassConditioning", "TextConditioning", "CAPTION_STREAM"]

# The stream of the caption draws (the trainer's are 1 and 2, the objectives' from 100).
CAPTION_STREAM = 3


class TextBatch(dict):
    """A text condition ``{"tokens" [B, L, D], "mask" [B, L], "pooled" [B, P]}`` that is
    sliced by rows like a tensor (``cond[2:5]``, ``cond[index]``) and moved with ``.to``,
    so the trainer and the objectives treat it as they treat labels ``[B]``."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return TextBatch({k: v[key] for k, v in self.items()})

    def to(self, device) -> "TextBatch":
        return TextBatch({k: v.to(device) for k, v in self.items()})

    def __len__(self) -> int:  # rows, as for a tensor
        return next(iter(self.values())).shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self)])


class ClassConditioning:
    """Labels ``[B]``; the dropped ones are replaced by ``null_class``."""

    kind = "class"

    def __init__(self, null_class: Optional[int]):
        self.null_class = null_class

    def draw(self, step: int, seed: int, global_batch: int) -> Optional[Tensor]:
        return None  # nothing to draw: the labels are the data's

    def condition(self, idx: Tensor, labels: Tensor, drop: Tensor, draws: Optional[Tensor]) -> Tensor:
        if self.null_class is None:
            return labels
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)


class TextConditioning:
    """Captions of every item, encoded once; one drawn per item and step.

    Args:
        captions: per data item, its captions (at least one each).
        encoder: a :class:`flowdit.models.text_encoder.TextEncoder`.
        cache_dir: where :func:`~flowdit.models.text_encoder.encode_cached` keeps the encodings.
        dtype: how the token states are held in memory (float16 halves the memory of
            ``L x D`` floats per caption; the model receives float32).
    """

    kind = "text"

    def __init__(self, captions: Sequence[Sequence[str]], encoder, cache_dir: str | Path,
                 dtype: torch.dtype = torch.float16, progress: bool = True):
        from ..models.text_encoder import encode_cached

        if not captions or any(len(c) == 0 for c in captions):
            raise ConfigError("text conditioning needs at least one caption per item (data set without captions?)")
        self.encoder = encoder
        unique: dict[str, int] = {"": 0}  # row 0: the empty prompt, the null condition
        rows = []
        for caps in captions:
            rows.append([unique.setdefault(str(c), len(unique)) for c in caps])
        texts = list(unique)
        if progress:
            print(f"flowdit: encoding {len(texts)} distinct captions with {encoder.identity}")
        enc = encode_cached(encoder, texts, cache_dir)
        self.tokens = enc["tokens"].to(dtype)
        self.mask = enc["mask"]
        self.pooled = enc["pooled"].float()
        self.counts = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        width = int(self.counts.max())
        self.table = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, r in enumerate(rows):
            self.table[i, :len(r)] = torch.tensor(r)
        self.texts = texts

    def draw(self, step: int, seed: int, global_batch: int) -> Tensor:
        """Uniforms ``[G]`` that choose each item's caption at ``step``."""
        return torch.rand(global_batch, generator=seeded_generator(seed, CAPTION_STREAM, step))

    def caption_rows(self, idx: Tensor, drop: Tensor, draws: Tensor) -> Tensor:
        """Rows of the encoded captions for items ``idx [B]``: the caption drawn by
        ``draws [B]``, or row 0 (the empty prompt) where ``drop [B]``."""
        pick = (draws * self.counts[idx]).long().clamp_max(self.counts[idx] - 1)
        rows = self.table[idx, pick]
        return torch.where(drop, torch.zeros_like(rows), rows)

    def rows_condition(self, rows: Tensor) -> TextBatch:
        return TextBatch(tokens=self.tokens[rows].float(), mask=self.mask[rows], pooled=self.pooled[rows])

    def condition(self, idx: Tensor, labels: Tensor, drop: Tensor, draws: Tensor) -> TextBatch:
        return self.rows_condition(self.caption_rows(idx, drop, draws))

    def encode(self, prompts: Sequence[str]) -> TextBatch:
        """The condition of arbitrary prompts (sampling grids), through the same encoder."""
        enc = self.encoder.encode(list(prompts))
        return TextBatch(tokens=enc["tokens"].float(), mask=enc["mask"], pooled=enc["pooled"].float())


def build_conditioning(cfg, dataset, model, progress: bool = True):
    """The conditioning a run config asks for: :class:`TextConditioning` on the data's
    captions when ``text.encoder`` is set, else :class:`ClassConditioning`."""
    if not cfg.text.encoder:
        return ClassConditioning(getattr(model, "null_class", None))
    from ..models.text_encoder import build_text_encoder

    captions = getattr(dataset, "captions", None)
    if not captions:
        raise ConfigError(f"text.encoder is set but the data ({dataset.name}) has no captions")
    encoder = build_text_encoder(cfg.text.encoder, max_length=cfg.text.max_length)
    want = (getattr(model.config, "text_dim", None), getattr(model.config, "pooled_dim", None))
    if want != (encoder.dim, encoder.pooled_dim):
        raise ConfigError(f"text.encoder {cfg.text.encoder}: token / pooled widths {encoder.dim} / {encoder.pooled_dim} "
                          f"differ from model {cfg.model.name}'s {want[0]} / {want[1]}")
    return TextConditioning(captions, encoder, cfg.text.cache_dir, progress=progress)
