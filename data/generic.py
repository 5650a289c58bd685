"""Generic files: jsonl, csv or parquet with text, label and lang columns (names settable), one
file with a split column or a directory of `{train,dev,test}.{jsonl,csv,parquet}`.
"""
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
from xlmr_mini.data.formats import (
    ENGLISH_CODES,
    SPLIT_ALIASES,
    Rows,
    assemble,
    decode,
    parquet_columns,
    read_bytes,
    read_jsonl,
    read_parquet,
    require_values,
    string_column,
)
from xlmr_mini.data.task import TaskData
from xlmr_mini.errors import InputError

# ---------------------------------------------------------------------------------------------
# Generic files: jsonl, csv, parquet


def _generic_table(path: Path, columns: dict[str, str]) -> tuple[pa.Table, list[int], str, list[str]]:
    """(table with the wanted columns present in the file, row locations, unit, notes)."""
    wanted = [c for c in columns.values() if c]
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        raw = read_bytes(path)
        # Text, language and split are strings; the label keeps its JSON type (string or integer).
        fields = {c: pa.string() for k, c in columns.items() if c and k != "label"}
        table, lines, blank = read_jsonl(raw, str(path), fields, other_fields="infer")
        notes = [f"{path}: skipped {blank} blank line(s)"] if blank else []
        return table, lines, "line", notes
    if suffix in (".csv", ".tsv"):
        raw = read_bytes(path)
        decode(raw, str(path))
        try:
            # use_threads=False: arrow's threaded CSV reader aborts the interpreter at exit
            # ("terminate called without an active exception") once torch is imported.
            table = pacsv.read_csv(
                io.BytesIO(raw),
                read_options=pacsv.ReadOptions(use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in wanted},
                                                     strings_can_be_null=False),
            )
        except pa.ArrowException as e:
            raise InputError(f"{path}: cannot parse {suffix[1:]} ({str(e).splitlines()[0]})") from None
        return table, list(range(1, table.num_rows + 1)), "row", []
    if suffix == ".parquet":
        table = read_parquet(path)
        return table, list(range(1, table.num_rows + 1)), "row", []
    raise InputError(f"{path}: unknown file type {suffix or '(none)'}; expected .jsonl, .csv, .tsv or .parquet")


def _generic_rows(path: Path, columns: dict[str, str], split: str | None) -> Rows:
    table, lines, unit, notes = _generic_table(path, columns)
    required = [columns["text"], columns["label"], columns["lang"]] + ([columns["split"]] if split is None else [])
    # A jsonl key absent from every line reads as an all-null column: treat it as absent.
    present = [c for c in table.column_names if table.column(c).null_count < table.num_rows]
    missing = [c for c in required if c not in present]
    if missing and table.num_rows:
        hint = " (set the names with ?text=..&label=..&lang=..)"
        raise InputError(f"{path}: no column(s) {', '.join(missing)}{hint}")
    if table.num_rows == 0:
        raise InputError(f"{path}: empty split, no examples")
    require_values(table, required, str(path), lines, unit)
    label_type = table.schema.field(columns["label"]).type
    labels = table.column(columns["label"]).to_pylist()
    if not (pa.types.is_integer(label_type) or pa.types.is_string(label_type)):
        raise InputError(f"{path}: label column {columns['label']!r} has type {label_type}; expected strings or integers")
    if split is None:
        splits = []
        for value, line in zip(table.column(columns["split"]).to_pylist(), lines):
            if value not in SPLIT_ALIASES:
                raise InputError(f"{path} {unit} {line}: split {value!r} is not train, dev/validation or test")
            splits.append(SPLIT_ALIASES[value])
    else:
        splits = [split] * table.num_rows
    texts = string_column(table, columns["text"], str(path))
    langs = string_column(table, columns["lang"], str(path))
    return Rows(str(path), texts, labels, langs, splits, lines, unit, notes)


def read_files(path: str | Path, text="text", label="label", lang="lang", split="split",
               unseen=None, english=None) -> TaskData:
    """Users' own task: one file with a split column (or train only), or a folder of split files."""
    path = Path(path)
    columns = {"text": text, "label": label, "lang": lang, "split": split}
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    notes: list[str] = []
    if path.is_file():
        table_columns = _column_names(path)
        if split in table_columns:
            parts = [_generic_rows(path, columns, None)]
        else:
            parts = [_generic_rows(path, columns, "train")]
            notes.append(f"{path}: no {split!r} column; all {len(parts[0].texts)} rows are train")
    else:
        parts = []
        for f in sorted(path.iterdir()):
            name = f.name.split(".")[0].split("-")[0]
            if f.is_file() and name in SPLIT_ALIASES and f.suffix.lower() in (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet"):
                parts.append(_generic_rows(f, columns, SPLIT_ALIASES[name]))
        if not parts:
            raise InputError(f"{path}: no train/dev/test .jsonl, .csv or .parquet files in this folder")
    present = {lang for p in parts for lang in p.langs}
    if english is None:
        english = next((code for code in ENGLISH_CODES if code in present), None)
    return assemble("file", str(path), parts, unseen=frozenset(unseen or ()), english=english,
                     extra_notes=notes, same_splits_everywhere=False)


def _column_names(path: Path) -> list[str]:
    """Column names of a generic file, cheaply (the first row of jsonl/csv, the parquet schema)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return parquet_columns(path)
    raw = read_bytes(path)
    first = next((line for line in raw.split(b"\n") if line.strip()), b"")
    if suffix in (".csv", ".tsv"):
        return [c.strip().strip('"') for c in first.decode("utf-8", "replace").split("\t" if suffix == ".tsv" else ",")]
    try:
        obj = json.loads(first) if first else {}
    except json.JSONDecodeError:
        return []  # the full read reports the line
    return list(obj) if isinstance(obj, dict) else []
