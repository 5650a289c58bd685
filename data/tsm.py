"""tweet_sentiment_multilingual: the cardiffnlp xlm-t layout `{language}/{split}_text.txt` +
`{split}_labels.txt`, or the HF parquet export (`{language}/{split}/*.parquet`: text, label).
"""
from pathlib import Path

import pyarrow.parquet as pq
from xlmr_mini.data.formats import (
    SPLIT_ALIASES,
    TSM_LABELS,
    Rows,
    assemble,
    parquet_files,
    parquet_split,
    read_bytes,
    read_parquet,
    require_values,
    string_column,
    text_lines,
)
from xlmr_mini.data.partitions import ENGLISH, TSM_LANGUAGES, UNSEEN, check_partition
from xlmr_mini.data.task import TaskData
from xlmr_mini.errors import InputError

# ---------------------------------------------------------------------------------------------
# tweet_sentiment_multilingual


def _tsm_label(value, where: str, unit: str, number: int) -> int:
    if isinstance(value, str):
        value = value.strip()
        if value in TSM_LABELS:
            return TSM_LABELS.index(value)
        if value in ("0", "1", "2"):
            return int(value)
    elif isinstance(value, int) and 0 <= value <= 2:
        return value
    raise InputError(f"{where} {unit} {number}: label {value!r} is not one of 0, 1, 2 ({', '.join(TSM_LABELS)})")


def _tsm_text_files(folder: Path, language: str) -> list[Rows]:
    parts = []
    for split in ("train", "val", "test"):
        text_path, label_path = folder / f"{split}_text.txt", folder / f"{split}_labels.txt"
        if not text_path.exists() and not label_path.exists():
            continue
        if not label_path.exists():
            raise InputError(f"{label_path}: file not found (the labels for {text_path.name})")
        if not text_path.exists():
            raise InputError(f"{text_path}: file not found (the texts for {label_path.name})")
        texts = text_lines(read_bytes(text_path), str(text_path))
        labels = text_lines(read_bytes(label_path), str(label_path))
        if len(texts) != len(labels):
            raise InputError(f"{label_path}: {len(labels)} lines but {text_path.name} has {len(texts)}")
        if not texts:
            raise InputError(f"{text_path}: empty split, no examples")
        ids = [_tsm_label(v, str(label_path), "line", i) for i, v in enumerate(labels, start=1)]
        n = len(texts)
        parts.append(Rows(str(label_path), texts, ids, [language] * n, [SPLIT_ALIASES[split]] * n,
                           list(range(1, n + 1))))
    if not any(p.splits[0] == "train" for p in parts):
        raise InputError(f"{folder / 'train_text.txt'}: file not found (every language needs a train split)")
    return parts


def _tsm_parquet(path: Path, root: Path) -> Rows:
    table = read_parquet(path)
    missing = [c for c in ("text", "label") if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: no column(s) {', '.join(missing)} (has: {', '.join(table.column_names)})")
    n = table.num_rows
    if n == 0:
        raise InputError(f"{path}: empty split, no examples")
    lines = list(range(1, n + 1))
    require_values(table, ("text", "label"), str(path), lines, "row")
    folders = path.relative_to(root).parts[:-1] if path != root else ()
    language = next((p for p in folders if p in TSM_LANGUAGES), None)
    if language is None and "lang" in table.column_names:
        langs = string_column(table, "lang", str(path))
    elif language is None:
        raise InputError(f"{path}: no language folder (like english/) in its path and no 'lang' column")
    else:
        langs = [language] * n
    split = parquet_split(path, root)
    if split is None:
        raise InputError(f"{path}: no train/validation/test in its path")
    labels = [_tsm_label(v, str(path), "row", i) for i, v in enumerate(table.column("label").to_pylist(), start=1)]
    return Rows(str(path), string_column(table, "text", str(path)), labels, langs, [split] * n, lines, "row")


def read_tsm(path: str | Path, unseen=None) -> TaskData:
    """tweet_sentiment_multilingual from the xlm-t text layout or HF parquet files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory (expected {{language}}/{{split}}_text.txt or parquet)")
    parts: list[Rows] = []
    notes: list[str] = []
    if path.is_dir() and (path / "train_text.txt").exists():
        parts = _tsm_text_files(path, path.name)
    elif path.is_dir() and any(path.glob("*/*_text.txt")):
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            if any(folder.glob("*_text.txt")) or any(folder.glob("*_labels.txt")):
                parts.extend(_tsm_text_files(folder, folder.name))
    else:
        files = parquet_files(path)
        if not files:
            raise InputError(f"{path}: no tweet_sentiment_multilingual {{split}}_text.txt or .parquet files")
        # The HF export's "all" config repeats every language without saying which: not used.
        skipped = [f for f in files if "all" in f.relative_to(path).parts[:-1]] if path.is_dir() else []
        if skipped:
            rows = sum(pq.read_metadata(f).num_rows for f in skipped)
            notes.append(f"{path}: skipped the 'all' config ({len(skipped)} file(s), {rows} rows) as it repeats the per-language ones")
        parts = [_tsm_parquet(f, path) for f in files if f not in skipped]
    strange = sorted({lang for p in parts for lang in p.langs} - TSM_LANGUAGES)
    if strange:
        notes.append(f"{path}: language(s) {', '.join(strange)} are not tweet_sentiment_multilingual languages; counted as seen")
    unseen = check_partition(unseen, "tsm", f"{path} unseen=") if unseen is not None else UNSEEN["tsm"]
    return assemble("tsm", str(path), parts, labels=TSM_LABELS, unseen=unseen, english=ENGLISH["tsm"],
                     extra_notes=notes, same_splits_everywhere=True)
