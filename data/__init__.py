"""Dataset readers, language partitions, subsets, batching and the built-in demo task.

    task = load_task("massive:/path/to/1.1/data")       # or tsm:PATH, file:PATH?text=..&label=.., demo
    train = select_languages(task.splits["train"], "seen", task)
    train = stratified_subset(train, 0.05, seed=0)
    enc = encode_split(train, Tokenizer(path), max_length=128)
    for batch in epoch_batches(enc, 32, seed=0, epoch=0, pad_id=tok.pad_id): ...
"""
from xlmr_mini.data.batching import Batches, EncodedSplit, default_cache_dir, encode_split, epoch_batches
from xlmr_mini.data.demo import DEMO_VERSION, build_demo
from xlmr_mini.data.partitions import (
    ENGLISH, MASSIVE_LOCALES, TSM_LANGUAGES, UNSEEN, resolve_languages, select_languages,
)
from xlmr_mini.data.formats import TSM_LABELS
from xlmr_mini.data.generic import read_files
from xlmr_mini.data.massive import read_massive
from xlmr_mini.data.readers import load_task, parse_spec
from xlmr_mini.data.tsm import read_tsm
from xlmr_mini.data.subsets import stratified_subset
from xlmr_mini.data.task import Split, TaskData

__all__ = [
    "Batches", "DEMO_VERSION", "ENGLISH", "EncodedSplit", "MASSIVE_LOCALES", "Split", "TSM_LABELS",
    "TSM_LANGUAGES", "TaskData", "UNSEEN", "build_demo", "default_cache_dir", "encode_split",
    "epoch_batches", "load_task", "parse_spec", "read_files", "read_massive", "read_tsm",
    "resolve_languages", "select_languages", "stratified_subset",
]
