"""Tokenize once (cached), then length-bucketed, dynamically padded batches.

Tweets average ~27 XLM-R tokens (p99 ~55), so padding every batch to 128 would spend ~4x the
compute on padding; batches here are padded to their own longest example, and training batches
are drawn from pools of similar lengths.
"""
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xlmr_mini.data.task import Split
from xlmr_mini.files import atomic_write, file_sha256

ENCODING_VERSION = 2  # bump when the cached layout or the encoding rule changes (2: transformers' whitespace)
POOL_BATCHES = 50  # batches per length-sorting pool: big enough to bucket, small enough to stay random


def default_cache_dir() -> Path:
    """`$XLMR_MINI_CACHE`, else ~/.cache/xlmr_mini."""
    return Path(os.environ.get("XLMR_MINI_CACHE") or Path.home() / ".cache" / "xlmr_mini")


def texts_sha256(texts: list[str]) -> str:
    """A content hash of a list of texts (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for text in texts:
        b = text.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


@dataclass
class EncodedSplit:
    """A tokenized split, stored flat: example i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray  # int32 [total tokens], <s> ... </s> per example, back to back
    offsets: np.ndarray  # int64 [N + 1]
    labels: np.ndarray  # int64 [N]
    langs: list[str]  # [N]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def ids(self) -> list[np.ndarray]:
        """Token ids per example (views into `tokens`)."""
        return np.split(self.tokens, self.offsets[1:-1])


def _load_cached(path: Path, n: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (tokens, offsets), or None if missing or not self-consistent."""
    try:
        with np.load(path, allow_pickle=False) as f:
            tokens, offsets = f["tokens"], f["offsets"]
    except Exception:  # a truncated or foreign file: rebuild, whatever numpy raised
        return None
    ok = (
        tokens.dtype == np.int32 and offsets.dtype == np.int64 and offsets.shape == (n + 1,)
        and offsets[0] == 0 and offsets[-1] == len(tokens) and bool(np.all(np.diff(offsets) >= 2))
        and (len(tokens) == 0 or (tokens.min() >= 0 and tokens.max() < vocab_size))
    )
    return (tokens, offsets) if ok else None


def encode_split(split: Split, tokenizer, max_length: int, cache_dir=None) -> EncodedSplit:
    """Tokenize `split` with `<s> ... </s>`, truncated to `max_length`, cached on disk.

    The cache key is the tokenizer file's hash, `max_length` and the texts' content hash, so a
    changed tokenizer or data file never reuses stale ids. `cache_dir=False` disables the cache.
    """
    n = len(split)
    path = None
    if cache_dir is not False:
        key = hashlib.sha256(
            f"v{ENCODING_VERSION}|{file_sha256(tokenizer.path)}|{max_length}|{texts_sha256(split.texts)}".encode()
        ).hexdigest()[:32]
        path = Path(cache_dir or default_cache_dir()) / "encoded" / f"{key}.npz"
        cached = _load_cached(path, n, tokenizer.vocab_size)
        if cached is not None:
            return EncodedSplit(cached[0], cached[1], split.labels, split.langs)
    ids = tokenizer.encode_ids(split.texts, max_length) if n else []
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, tokens=tokens, offsets=offsets)
        atomic_write(path, buffer.getvalue())
    return EncodedSplit(tokens, offsets, split.labels, split.langs)


def _batch_plan(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool,
                sort_by_length: bool, group_by_length: bool) -> list[np.ndarray]:
    n = len(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable") if sort_by_length else np.arange(n)
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    pool = batch_size * POOL_BATCHES
    batches = []
    for start in range(0, n, pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class Batches(Sequence):
    """An epoch's batches, built on access: indexing, slicing (to resume after k), len, iteration.

    Each batch is a dict: input_ids and attention_mask int64 [B, T] padded to the batch's longest,
    labels int64 [B], langs list[str], index int64 [B] (the examples' positions in the split).
    """

    def __init__(self, enc: EncodedSplit, plan: list[np.ndarray], pad_id: int):
        self.enc, self.plan, self.pad_id = enc, plan, pad_id

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Batches(self.enc, self.plan[i], self.pad_id)
        index = self.plan[i]
        starts, ends = self.enc.offsets[index], self.enc.offsets[index + 1]
        lengths = ends - starts
        mask = np.arange(int(lengths.max()))[None, :] < lengths[:, None]  # [B, T]
        input_ids = np.full(mask.shape, self.pad_id, dtype=np.int64)
        input_ids[mask] = np.concatenate([self.enc.tokens[s:e] for s, e in zip(starts, ends)])
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": torch.from_numpy(self.enc.labels[index].astype(np.int64)),
            "langs": [self.enc.langs[j] for j in index],
            "index": torch.from_numpy(index.astype(np.int64)),
        }


def epoch_batches(enc: EncodedSplit, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                  pad_id: int, sort_by_length: bool = False, group_by_length: bool = True) -> Batches:
    """The batches of one epoch, a deterministic function of (seed, epoch).

    shuffle=True: shuffle, cut into pools of 50 batches, sort each pool by length, cut batches,
    shuffle the batch order; with group_by_length=False plain random batches (a shuffle cut in
    order, as transformers' Trainer draws them). Resuming mid-epoch = rebuilding this and
    skipping the first k.
    shuffle=False (evaluation): dataset order, or length order with `sort_by_length` (each
    batch's `index` maps predictions back).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    plan = _batch_plan(enc.lengths, batch_size, seed, epoch, shuffle, sort_by_length, group_by_length)
    return Batches(enc, plan, pad_id)
