"""What every reader shares: raw rows, bytes -> lines, jsonl and parquet -> arrow, and the
assembly of raw rows into a `TaskData` (label names -> ids, splits, notes). Bad input raises
`InputError` naming the file and, where there is one, the line.
"""
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
from xlmr_mini.data.task import SPLIT_NAMES, Split, TaskData
from xlmr_mini.errors import InputError

TSM_LABELS = ("negative", "neutral", "positive")
# Published split names -> ours. TSM's "val" and HF's "validation" are our "dev".
SPLIT_ALIASES = {"train": "train", "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev", "test": "test"}
ENGLISH_CODES = ("en", "en-US", "english", "eng")
LOCALE_RE = re.compile(r"^[a-z]{2,3}-[A-Z]{2}$")


@dataclass
class Rows:
    """Rows read from one file, before labels become ids. `lines[i]` locates row i in `where`."""

    where: str
    texts: list[str]
    labels: list  # raw label values: str or int
    langs: list[str]
    splits: list[str]  # our split names
    lines: list[int]
    unit: str = "line"  # what `lines` counts: "line" (jsonl, txt) or "row" (csv, parquet)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Low-level: bytes -> lines, jsonl -> arrow, parquet -> arrow


def read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    return path.read_bytes()


def decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"{where} line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def text_lines(raw: bytes, where: str) -> list[str]:
    """Lines split on '\\n' only (tweets may hold other Unicode line breaks); CRLF tolerated."""
    text = decode(raw, where)
    if text == "":
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_jsonl(raw: bytes, where: str, fields: dict[str, pa.DataType], other_fields: str = "ignore"
                ) -> tuple[pa.Table, list[int], int]:
    """Parse JSON lines with pyarrow: (table of `fields`, line number per row, blank lines skipped).

    `other_fields` is "ignore" (drop the rest) or "infer" (keep them, types inferred). On a parse
    failure, Python's json finds the line and says what is wrong with it.
    """
    decode(raw, where)
    raw_lines = raw.split(b"\n")
    row_lines = [i + 1 for i, line in enumerate(raw_lines) if line.strip()]
    blank = len(raw_lines) - len(row_lines) - (1 if raw.endswith(b"\n") else 0)
    if not row_lines:
        return pa.table({k: pa.array([], type=t) for k, t in fields.items()}), [], blank
    options = pajson.ParseOptions(explicit_schema=pa.schema(fields), unexpected_field_behavior=other_fields)
    try:
        table = pajson.read_json(io.BytesIO(raw), parse_options=options, read_options=pajson.ReadOptions(block_size=1 << 24))
    except pa.ArrowException as e:
        locate_json_error(raw_lines, where, fields)
        message = str(e).splitlines()[0]
        changed = re.search(r"Column\(/(.+)\) changed from (\w+) to (\w+) in row (\d+)", message)
        if changed and int(changed[4]) < len(row_lines):  # the row is 0-based, among non-blank lines
            name, before, after, row = changed.groups()
            raise InputError(f"{where} line {row_lines[int(row)]}: field {name!r} is a {after} here but a {before} above") from None
        raise InputError(f"{where}: {message}") from None
    if table.num_rows != len(row_lines):
        raise InputError(f"{where}: {table.num_rows} JSON objects on {len(row_lines)} non-blank lines")
    return table, row_lines, blank


def locate_json_error(raw_lines: list[bytes], where: str, fields: dict[str, pa.DataType]) -> None:
    for number, line in enumerate(raw_lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where} line {number}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where} line {number}: expected a JSON object, got {type(obj).__name__}")
        for name, dtype in fields.items():
            value = obj.get(name)
            if value is not None and pa.types.is_string(dtype) and not isinstance(value, str):
                raise InputError(f"{where} line {number}: field {name!r} should be a string, got {value!r}")


def require_values(table: pa.Table, columns, where: str, lines: list[int], unit: str) -> None:
    """Every row has every column: no nulls (a missing JSON key reads as null)."""
    for name in columns:
        column = table.column(name)
        if column.null_count:
            first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{where} {unit} {lines[first]}: missing value for {name!r}")


def string_column(table: pa.Table, name: str, where: str) -> list[str]:
    """A column of text as Python strings; a column of another type (numbers, lists) is one line."""
    kind = table.schema.field(name).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(f"{where}: column {name!r} has type {kind}; expected strings")
    return table.column(name).to_pylist()


def read_parquet(path: Path, columns=None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None


def parquet_columns(path: Path) -> list[str]:
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None


def hf_class_names(path: Path, column: str) -> list[str] | None:
    """ClassLabel names that a Hugging Face parquet export stores in its schema metadata."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
    except (KeyError, ValueError, TypeError, pa.ArrowException):
        return None
    names = features.get(column, {}).get("names") if isinstance(features, dict) else None
    return list(names) if names else None


def parquet_split(path: Path, root: Path) -> str | None:
    """The split a parquet file holds, from its folder or file name (`train/0000.parquet`,
    `validation-00000-of-00001.parquet`)."""
    parts = list(path.relative_to(root).parts[:-1]) if path != root else []
    stem_parts = re.split(r"[-_.]", path.name)
    for token in [*reversed(parts), *stem_parts]:
        if token in SPLIT_ALIASES:
            return SPLIT_ALIASES[token]
    return None


def parquet_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet")) if root.is_dir() else [root]




# ---------------------------------------------------------------------------------------------
# Assembly: raw rows -> label ids -> Splits


def label_names(train_labels: list) -> tuple[str, ...]:
    values = set(train_labels)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return tuple(str(v) for v in sorted(values))
    if all(isinstance(v, str) for v in values):
        if all(re.fullmatch(r"-?\d+", v) for v in values):
            return tuple(sorted(values, key=int))
        return tuple(sorted(values))
    return tuple(sorted(str(v) for v in values))


def assemble(name: str, source: str, parts: list[Rows], *, labels: tuple[str, ...] | None = None,
              unseen: frozenset[str], english: str | None, extra_notes=(), same_splits_everywhere: bool) -> TaskData:
    if not parts:
        raise InputError(f"{source}: no examples found")
    notes = [note for p in parts for note in p.notes] + list(extra_notes)
    if labels is None:
        train = [v for p in parts for v, s in zip(p.labels, p.splits) if s == "train"]
        if not train:
            raise InputError(f"{source}: no train split (the label set is fixed by the train split)")
        labels = label_names(train)
        index = {v: i for i, v in enumerate(labels)}
        to_id = lambda v: index.get(str(v))  # noqa: E731
    else:
        to_id = lambda v: v  # noqa: E731  (ids already checked by the reader)
    columns = {s: ([], [], []) for s in SPLIT_NAMES}
    for p in parts:
        for text, value, lang, split, line in zip(p.texts, p.labels, p.langs, p.splits, p.lines):
            label = to_id(value)
            if label is None:
                raise InputError(f"{p.where} {p.unit} {line}: label {value!r} is not in the train split's {len(labels)} labels")
            texts, ids, langs = columns[split]
            texts.append(text)
            ids.append(label)
            langs.append(lang)
    splits = {s: Split(t, np.asarray(i, dtype=np.int64), l) for s, (t, i, l) in columns.items() if t}
    if "train" not in splits:
        raise InputError(f"{source}: no train split")
    if same_splits_everywhere:
        languages = sorted({lang for split in splits.values() for lang in split.langs})
        for split_name, split in splits.items():
            missing = sorted(set(languages) - set(split.langs))
            if missing:
                raise InputError(f"{source}: split {split_name!r} is missing for language(s) {', '.join(missing)}")
    return TaskData(name=name, labels=tuple(labels), splits=splits, unseen=frozenset(unseen), source=source,
                    tokenizer_path=None, english=english, notes=tuple(notes))
