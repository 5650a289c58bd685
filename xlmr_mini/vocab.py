"""Exact vocabulary trimming: train and ship only the word-embedding rows a task uses.

A task's texts use few of XLM-R's 250,002 pieces (tweet_sentiment_multilingual: ~39k over all
splits). A row whose token never occurs in training gets a zero gradient at every step, so AdamW
(zero moments, zero update) never moves it; with weight decay it only shrinks by the product of
(1 - lr_t * wd). Training on the rows that occur, and writing the others back at their initial
values times that product, is therefore the same run: faster, and without a dense 250,002-row
gradient and two Adam states.

The kept set (`VocabTrim.kept`, sorted old ids; new id i is old id kept[i]) covers every token of
every split the model is run on (train, dev, the reported split) and the tokenizer's special and
added tokens. Everything here is a pure function on arrays, state dicts or a tokenizer.json dict.

Tokenizer trimming supports Unigram models (XLM-R's): Viterbi over a subset of the pieces with
the same scores finds the same best path for every text whose full-vocabulary best path uses only
kept pieces. The lowest-scoring piece is kept too, because Unigram scores an unknown character at
(lowest score - 10): keeping it keeps that score, so texts with unknown characters also segment
as before.
"""
import copy
import dataclasses
import mmap
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from xlmr_mini.config import XLMRConfig
from xlmr_mini.data import EncodedSplit
from xlmr_mini.errors import InputError

WORD_KEY = "roberta.embeddings.word_embeddings.weight"


@dataclasses.dataclass(frozen=True)
class VocabTrim:
    """A kept subset of a `full_size` vocabulary; new id i is old id `kept[i]`."""

    kept: np.ndarray  # int64 [K], sorted, unique
    full_size: int
    # The full table's word-embedding rows before training, for writing a full-vocabulary model
    # (a tensor, or `DiskRows` holding them out of memory until a save reads them).
    initial_rows: "torch.Tensor | DiskRows | None" = None

    @property
    def size(self) -> int:
        return len(self.kept)

    @property
    def old_to_new(self) -> np.ndarray:
        """int64 [full_size]: the new id of each old id, -1 where not kept."""
        table = np.full(self.full_size, -1, dtype=np.int64)
        table[self.kept] = np.arange(len(self.kept))
        return table

    def to_task(self, enc: EncodedSplit) -> EncodedSplit:
        """The split with token ids in the trimmed numbering (every id must be kept)."""
        new = self.old_to_new[enc.tokens]
        if new.size and new.min() < 0:
            missing = sorted(set(enc.tokens[new < 0].tolist()))[:5]
            raise ValueError(f"token ids {missing} are not in the kept vocabulary")
        return dataclasses.replace(enc, tokens=new.astype(np.int32))

    def to_full(self, enc: EncodedSplit) -> EncodedSplit:
        """The split with token ids back in the full numbering."""
        return dataclasses.replace(enc, tokens=self.kept[enc.tokens].astype(np.int32))


def always_kept(tokenizer: dict) -> list[int]:
    """Ids a trimmed vocabulary keeps whatever the data: added/special tokens, Unigram's unk and
    its lowest-scoring piece (which sets the unknown-character score, see the module docstring)."""
    ids = [t["id"] for t in tokenizer.get("added_tokens", [])]
    model = tokenizer.get("model", {})
    if model.get("type") == "Unigram":
        scores = np.array([score for _, score in model["vocab"]])
        ids.append(int(scores.argmin()))
        if model.get("unk_id") is not None:
            ids.append(int(model["unk_id"]))
    return ids


def kept_ids(token_arrays: Iterable[np.ndarray], full_size: int, always: Iterable[int] = ()) -> VocabTrim:
    """The vocabulary that every token of `token_arrays` and every id in `always` needs."""
    present = np.zeros(full_size, dtype=bool)
    for tokens in token_arrays:
        present[np.asarray(tokens, dtype=np.int64)] = True
    present[np.asarray(list(always), dtype=np.int64)] = True
    return VocabTrim(kept=np.flatnonzero(present).astype(np.int64), full_size=full_size)


def trim_config(cfg: XLMRConfig, trim: VocabTrim) -> XLMRConfig:
    """The config of the trimmed model: smaller vocabulary, special ids renumbered."""
    table = trim.old_to_new
    ids = {name: int(table[getattr(cfg, name)]) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    if min(ids.values()) < 0:
        raise ValueError(f"special token ids {ids} must be kept")
    return cfg.replace(vocab_size=trim.size, **ids)


def full_config(cfg: XLMRConfig, trim: VocabTrim) -> XLMRConfig:
    """The inverse of `trim_config`."""
    ids = {name: int(trim.kept[getattr(cfg, name)]) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return cfg.replace(vocab_size=trim.full_size, **ids)


def trim_state_dict(state: dict[str, torch.Tensor], trim: VocabTrim) -> dict[str, torch.Tensor]:
    """HF state dict with only the kept word-embedding rows (other tensors shared, not copied)."""
    return {**state, WORD_KEY: state[WORD_KEY][torch.from_numpy(trim.kept)].clone()}


def expand_state_dict(state: dict[str, torch.Tensor], trim: VocabTrim,
                      untouched_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The full-vocabulary state dict: kept rows from `state`, every other row its initial value
    (`trim.initial_rows`)
    times `untouched_scale` (the product of (1 - lr_t * wd) over the steps taken; 1 without
    weight decay, which leaves those rows bit-equal to where they started)."""
    trimmed = state[WORD_KEY]
    rows = trim.initial_rows
    full = (rows.tensor() if isinstance(rows, DiskRows) else rows).to(device=trimmed.device, dtype=trimmed.dtype,
                                                                      copy=True)
    if isinstance(rows, DiskRows):
        rows.release()
    if untouched_scale != 1.0:
        full.mul_(untouched_scale)
    full[torch.from_numpy(trim.kept).to(trimmed.device)] = trimmed
    return {**state, WORD_KEY: full}


class DiskRows:
    """A float32 table kept in an unlinked temporary file and memory-mapped: it takes no memory
    until read, and a read's pages are handed back afterwards (`release`). The full vocabulary's
    initial word-embedding rows (250,002 x 768: 768 MB) are read only when a model is saved, yet
    held in memory they were a quarter of a trimmed KD step's peak."""

    def __init__(self, rows: torch.Tensor, directory: str | Path):
        rows = rows.detach().to("cpu", torch.float32).contiguous()
        self.shape = tuple(rows.shape)
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as f:  # no name: the disk is freed with the process
            f.write(memoryview(rows.numpy()).cast("B"))
            f.flush()
            self._map = mmap.mmap(f.fileno(), rows.numel() * 4, access=mmap.ACCESS_COPY)

    def tensor(self) -> torch.Tensor:
        """The rows, read from the file as they are touched (a private mapping: writes stay local)."""
        return torch.frombuffer(self._map, dtype=torch.float32).view(self.shape)

    def release(self) -> None:
        """Drop the pages a read brought into memory (unchanged: they are the file's)."""
        self._map.madvise(mmap.MADV_DONTNEED)


def offload_rows(rows: torch.Tensor, directory: str | Path) -> "DiskRows | torch.Tensor":
    """`rows` as `DiskRows` in `directory`; the tensor itself where the disk will not take them."""
    try:
        return DiskRows(rows, directory)
    except OSError:
        return rows.detach().float()


def weight_decay_scale(lrs: Iterable[float], weight_decay: float) -> float:
    """How much AdamW's decoupled weight decay shrinks a parameter whose gradient was always zero."""
    scale = 1.0
    for lr in lrs:
        scale *= 1.0 - lr * weight_decay
    return scale


def trim_tokenizer(tokenizer: dict, trim: VocabTrim) -> dict:
    """A tokenizer.json (as a dict) holding only the kept pieces, ids renumbered; Unigram only."""
    model = tokenizer.get("model", {})
    if model.get("type") != "Unigram":
        raise InputError(f"only Unigram tokenizers (XLM-R's) can be trimmed; this one is {model.get('type')!r}")
    if int(trim.kept[-1]) >= len(model["vocab"]):
        raise InputError(f"the tokenizer has {len(model['vocab'])} pieces, fewer than the model's vocabulary")
    table = trim.old_to_new[: len(model["vocab"])]
    missing = [i for i in always_kept(tokenizer) if table[i] < 0]
    if missing:
        raise ValueError(f"special and added token ids {missing} must be kept")
    out = copy.deepcopy({k: v for k, v in tokenizer.items() if k != "model"})
    out["model"] = {**{k: v for k, v in model.items() if k != "vocab"},
                    "vocab": [model["vocab"][i] for i in trim.kept.tolist()]}
    if model.get("unk_id") is not None:
        out["model"]["unk_id"] = int(table[model["unk_id"]])
    for token in out.get("added_tokens", []):
        token["id"] = int(table[token["id"]])
    for special in (out.get("post_processor") or {}).get("special_tokens", {}).values():
        special["ids"] = [int(table[i]) for i in special["ids"]]
    return out


def unk_rates(enc: EncodedSplit, unk_id: int) -> tuple[float, dict[str, float]]:
    """Share of <unk> among the tokens of each language (and overall), `<s>`/`</s>` not counted."""
    is_unk = np.add.reduceat((enc.tokens == unk_id).astype(np.int64), enc.offsets[:-1]) if len(enc) else np.zeros(0)
    pieces = np.maximum(enc.lengths - 2, 0)
    langs = np.asarray(enc.langs, dtype=object)

    def rate(keep):
        n = pieces[keep].sum()
        return float(is_unk[keep].sum() / n) if n else 0.0

    return rate(np.ones(len(enc), dtype=bool)), {lang: rate(langs == lang) for lang in sorted(set(enc.langs))}
