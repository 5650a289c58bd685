"""Stratified subsets of a training split (paper §4.2: 1%, 5%, 10%, 20% of MASSIVE)."""
import zlib

import numpy as np

from xlmr_mini.data.task import Split
from xlmr_mini.errors import InputError


def _allocate(counts: np.ndarray, fraction: float) -> np.ndarray:
    """How many to keep per class: `fraction` of the total, split by largest remainder, and at
    least one of every class that has examples."""
    quota = counts * fraction
    keep = np.minimum(np.maximum(np.floor(quota).astype(np.int64), 1), counts)
    total = max(int(round(counts.sum() * fraction)), int((counts > 0).sum()))
    short = total - int(keep.sum())
    if short > 0:
        # Furthest below quota first (classes raised to 1 are not); ties by class id.
        room = np.flatnonzero(keep < counts)
        order = room[np.lexsort((room, -(quota[room] - keep[room])))]
        keep[order[:short]] += 1
    return keep


def stratified_subset(split: Split, fraction: float, seed: int) -> Split:
    """`fraction` of `split`, stratified by label within each language, in the original order.

    Per language the kept total is round(fraction * n), never dropping a class that has examples.
    Which examples are kept depends only on (seed, language, that language's examples), not on
    which other languages are in the split.
    """
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"subset fraction {fraction} must be in (0, 1]")
    if fraction == 1.0:
        return split
    langs = np.asarray(split.langs, dtype=object)
    kept = []
    for lang in sorted(set(split.langs)):
        members = np.flatnonzero(langs == lang)
        labels = split.labels[members]
        counts = np.bincount(labels, minlength=int(labels.max()) + 1)
        keep = _allocate(counts, fraction)
        rng = np.random.default_rng([seed, zlib.crc32(lang.encode("utf-8"))])
        for label in np.flatnonzero(keep):
            pool = members[labels == label]
            kept.append(pool[rng.permutation(len(pool))[: keep[label]]])
    return split.take(np.sort(np.concatenate(kept)))
