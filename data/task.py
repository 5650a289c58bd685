"""The in-memory form of a classification task: columnar splits of (text, label id, language)."""
from dataclasses import dataclass, field

import numpy as np

SPLIT_NAMES = ("train", "dev", "test")


@dataclass(frozen=True)
class Split:
    """One split of a task, columnar: example i is (texts[i], labels[i], langs[i])."""

    texts: list[str]
    labels: np.ndarray  # int64 [N] class ids into TaskData.labels
    langs: list[str]  # language or locale code per example

    def __post_init__(self):
        if not (len(self.texts) == len(self.labels) == len(self.langs)):
            raise ValueError(
                f"Split columns differ in length: {len(self.texts)} texts, "
                f"{len(self.labels)} labels, {len(self.langs)} langs"
            )
        if self.labels.dtype != np.int64 or self.labels.ndim != 1:
            raise ValueError(f"Split labels must be a 1-d int64 array, got {self.labels.dtype} {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices) -> "Split":
        """The examples at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return Split(
            texts=[self.texts[i] for i in indices],
            labels=self.labels[indices],
            langs=[self.langs[i] for i in indices],
        )

    def counts(self) -> dict[str, int]:
        """Examples per language, languages sorted."""
        values, counts = np.unique(np.asarray(self.langs, dtype=object), return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts)}


@dataclass(frozen=True)
class TaskData:
    """A loaded task: label names, its splits, and which of its languages count as unseen."""

    name: str  # "massive" | "tsm" | "file" | "demo"
    labels: tuple[str, ...]  # class names; index = class id
    splits: dict[str, Split]  # keys among "train", "dev", "test"
    unseen: frozenset[str]  # languages held out in the zero-shot setups (paper Table 1)
    source: str  # the path read, or "demo"
    tokenizer_path: str | None = None  # the demo's own tokenizer.json; None for the others
    english: str | None = None  # the language that the `english` choice selects
    notes: tuple[str, ...] = field(default=())  # what the reader skipped or assumed, with counts

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def languages(self) -> tuple[str, ...]:
        """Every language present in any split, sorted."""
        return tuple(sorted({lang for split in self.splits.values() for lang in split.langs}))

    @property
    def seen(self) -> frozenset[str]:
        """The present languages that are not unseen."""
        return frozenset(self.languages) - self.unseen
