"""Readers for MASSIVE, tweet_sentiment_multilingual and generic files, in their published forms.

- MASSIVE: the release directory (`1.1/data/{locale}.jsonl`), the release `.tar.gz` read in
  place, or a Hugging Face parquet export (`{locale}/{split}/*.parquet`, `intent` as string or as
  class id with the class names in the parquet's `huggingface` metadata).
- tweet_sentiment_multilingual: the cardiffnlp xlm-t layout `{language}/{split}_text.txt` +
  `{split}_labels.txt`, or the HF parquet export (`{language}/{split}/*.parquet`: text, label).
- Generic: jsonl, csv or parquet with text, label and lang columns (names settable), one file
  with a split column or a directory of `{train,dev,test}.{jsonl,csv,parquet}`.

Everything is read with pyarrow. Bad input raises `InputError` naming the file and, where there
is one, the line. Nothing is dropped silently: blank jsonl lines and skipped parquet configs are
counted in `TaskData.notes`.
"""
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from xlmr_mini.data.partitions import ENGLISH, MASSIVE_LOCALES, TSM_LANGUAGES, UNSEEN, check_partition
from xlmr_mini.data.task import SPLIT_NAMES, Split, TaskData
from xlmr_mini.errors import InputError

TSM_LABELS = ("negative", "neutral", "positive")
# Published split names -> ours. TSM's "val" and HF's "validation" are our "dev".
SPLIT_ALIASES = {"train": "train", "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev", "test": "test"}
ENGLISH_CODES = ("en", "en-US", "english", "eng")
_LOCALE_RE = re.compile(r"^[a-z]{2,3}-[A-Z]{2}$")


@dataclass
class _Rows:
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


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    return path.read_bytes()


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"{where} line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def _text_lines(raw: bytes, where: str) -> list[str]:
    """Lines split on '\\n' only (tweets may hold other Unicode line breaks); CRLF tolerated."""
    text = _decode(raw, where)
    if text == "":
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_jsonl(raw: bytes, where: str, fields: dict[str, pa.DataType], other_fields: str = "ignore"
                ) -> tuple[pa.Table, list[int], int]:
    """Parse JSON lines with pyarrow: (table of `fields`, line number per row, blank lines skipped).

    `other_fields` is "ignore" (drop the rest) or "infer" (keep them, types inferred). On a parse
    failure, Python's json finds the line and says what is wrong with it.
    """
    _decode(raw, where)
    raw_lines = raw.split(b"\n")
    row_lines = [i + 1 for i, line in enumerate(raw_lines) if line.strip()]
    blank = len(raw_lines) - len(row_lines) - (1 if raw.endswith(b"\n") else 0)
    if not row_lines:
        return pa.table({k: pa.array([], type=t) for k, t in fields.items()}), [], blank
    options = pajson.ParseOptions(explicit_schema=pa.schema(fields), unexpected_field_behavior=other_fields)
    try:
        table = pajson.read_json(io.BytesIO(raw), parse_options=options, read_options=pajson.ReadOptions(block_size=1 << 24))
    except pa.ArrowException as e:
        _locate_json_error(raw_lines, where, fields)
        message = str(e).splitlines()[0]
        changed = re.search(r"Column\(/(.+)\) changed from (\w+) to (\w+) in row (\d+)", message)
        if changed and int(changed[4]) < len(row_lines):  # the row is 0-based, among non-blank lines
            name, before, after, row = changed.groups()
            raise InputError(f"{where} line {row_lines[int(row)]}: field {name!r} is a {after} here but a {before} above") from None
        raise InputError(f"{where}: {message}") from None
    if table.num_rows != len(row_lines):
        raise InputError(f"{where}: {table.num_rows} JSON objects on {len(row_lines)} non-blank lines")
    return table, row_lines, blank


def _locate_json_error(raw_lines: list[bytes], where: str, fields: dict[str, pa.DataType]) -> None:
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


def _require_values(table: pa.Table, columns, where: str, lines: list[int], unit: str) -> None:
    """Every row has every column: no nulls (a missing JSON key reads as null)."""
    for name in columns:
        column = table.column(name)
        if column.null_count:
            first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{where} {unit} {lines[first]}: missing value for {name!r}")


def _read_parquet(path: Path, columns=None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None


def _parquet_columns(path: Path) -> list[str]:
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None


def _hf_class_names(path: Path, column: str) -> list[str] | None:
    """ClassLabel names that a Hugging Face parquet export stores in its schema metadata."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
    except (KeyError, ValueError, TypeError, pa.ArrowException):
        return None
    names = features.get(column, {}).get("names") if isinstance(features, dict) else None
    return list(names) if names else None


def _parquet_split(path: Path, root: Path) -> str | None:
    """The split a parquet file holds, from its folder or file name (`train/0000.parquet`,
    `validation-00000-of-00001.parquet`)."""
    parts = list(path.relative_to(root).parts[:-1]) if path != root else []
    stem_parts = re.split(r"[-_.]", path.name)
    for token in [*reversed(parts), *stem_parts]:
        if token in SPLIT_ALIASES:
            return SPLIT_ALIASES[token]
    return None


def _parquet_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet")) if root.is_dir() else [root]


# ---------------------------------------------------------------------------------------------
# MASSIVE

_MASSIVE_FIELDS = {"locale": pa.string(), "partition": pa.string(), "utt": pa.string(), "intent": pa.string()}


def _massive_jsonl(raw: bytes, where: str) -> _Rows:
    table, lines, blank = _read_jsonl(raw, where, _MASSIVE_FIELDS)
    if table.num_rows == 0:
        raise InputError(f"{where}: empty file, no examples")
    _require_values(table, _MASSIVE_FIELDS, where, lines, "line")
    partitions = table.column("partition").to_pylist()
    splits = []
    for partition, line in zip(partitions, lines):
        if partition not in ("train", "dev", "test"):
            raise InputError(f"{where} line {line}: partition {partition!r} is not train, dev or test")
        splits.append(partition)
    notes = [f"{where}: skipped {blank} blank line(s)"] if blank else []
    return _Rows(where, table.column("utt").to_pylist(), table.column("intent").to_pylist(),
                 table.column("locale").to_pylist(), splits, lines, "line", notes)


def _massive_parquet(path: Path, root: Path) -> _Rows:
    names = set(_parquet_columns(path))
    missing = [c for c in ("utt", "intent") if c not in names]
    if missing:
        raise InputError(f"{path}: no column(s) {', '.join(missing)} (has: {', '.join(sorted(names))})")
    columns = [c for c in ("utt", "intent", "locale", "partition") if c in names]
    table = _read_parquet(path, columns)
    n = table.num_rows
    if n == 0:
        raise InputError(f"{path}: empty split, no examples")
    lines = list(range(1, n + 1))
    _require_values(table, columns, str(path), lines, "row")
    intents = table.column("intent").to_pylist()
    if pa.types.is_integer(table.schema.field("intent").type):
        class_names = _hf_class_names(path, "intent")
        if class_names is None:
            raise InputError(f"{path}: integer 'intent' without class names in the parquet's huggingface metadata")
        for i, value in enumerate(intents):
            if not 0 <= value < len(class_names):
                raise InputError(f"{path} row {i + 1}: intent id {value} outside the {len(class_names)} class names")
        intents = [class_names[v] for v in intents]
    if "locale" in names:
        locales = table.column("locale").to_pylist()
    else:
        locale = next((p for p in reversed(path.relative_to(root).parts[:-1]) if _LOCALE_RE.match(p)), None) if path != root else None
        if locale is None:
            raise InputError(f"{path}: no 'locale' column and no locale folder (like en-US/) in its path")
        locales = [locale] * n
    if "partition" in names:
        splits = []
        for i, value in enumerate(table.column("partition").to_pylist()):
            if value not in SPLIT_ALIASES:
                raise InputError(f"{path} row {i + 1}: partition {value!r} is not train, dev or test")
            splits.append(SPLIT_ALIASES[value])
    else:
        split = _parquet_split(path, root)
        if split is None:
            raise InputError(f"{path}: no 'partition' column and no train/validation/test in its path")
        splits = [split] * n
    return _Rows(str(path), table.column("utt").to_pylist(), intents, locales, splits, lines, "row")


def read_massive(path: str | Path, unseen=None) -> TaskData:
    """MASSIVE from a release directory, a release .tar.gz, a single .jsonl, or parquet files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory (expected MASSIVE 1.1/data/, its .tar.gz, or parquet)")
    parts: list[_Rows] = []
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(path) as archive:
                for member in sorted(archive.getmembers(), key=lambda m: m.name):
                    if member.isfile() and member.name.endswith(".jsonl"):
                        raw = archive.extractfile(member).read()
                        parts.append(_massive_jsonl(raw, f"{path}:{member.name}"))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise InputError(f"{path}: cannot read archive ({e})") from None
        if not parts:
            raise InputError(f"{path}: archive holds no .jsonl files")
    elif path.is_file() and path.suffix == ".parquet":
        parts.append(_massive_parquet(path, path))
    elif path.is_file():
        parts.append(_massive_jsonl(_read_bytes(path), str(path)))
    else:
        files = sorted(path.rglob("*.jsonl"))
        if files:
            parts = [_massive_jsonl(_read_bytes(f), str(f)) for f in files]
        else:
            files = _parquet_files(path)
            if not files:
                raise InputError(f"{path}: no MASSIVE .jsonl or .parquet files in this folder")
            parts = [_massive_parquet(f, path) for f in files]
    notes = []
    found = {lang for p in parts for lang in p.langs}
    strange = sorted(found - MASSIVE_LOCALES)
    if strange:
        notes.append(f"{path}: locale(s) {', '.join(strange)} are not MASSIVE 1.1 locales; counted as seen")
    unseen = check_partition(unseen, "massive", f"{path} unseen=") if unseen is not None else UNSEEN["massive"]
    return _assemble("massive", str(path), parts, unseen=unseen, english=ENGLISH["massive"],
                     extra_notes=notes, same_splits_everywhere=True)


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


def _tsm_text_files(folder: Path, language: str) -> list[_Rows]:
    parts = []
    for split in ("train", "val", "test"):
        text_path, label_path = folder / f"{split}_text.txt", folder / f"{split}_labels.txt"
        if not text_path.exists() and not label_path.exists():
            continue
        if not label_path.exists():
            raise InputError(f"{label_path}: file not found (the labels for {text_path.name})")
        if not text_path.exists():
            raise InputError(f"{text_path}: file not found (the texts for {label_path.name})")
        texts = _text_lines(_read_bytes(text_path), str(text_path))
        labels = _text_lines(_read_bytes(label_path), str(label_path))
        if len(texts) != len(labels):
            raise InputError(f"{label_path}: {len(labels)} lines but {text_path.name} has {len(texts)}")
        if not texts:
            raise InputError(f"{text_path}: empty split, no examples")
        ids = [_tsm_label(v, str(label_path), "line", i) for i, v in enumerate(labels, start=1)]
        n = len(texts)
        parts.append(_Rows(str(label_path), texts, ids, [language] * n, [SPLIT_ALIASES[split]] * n,
                           list(range(1, n + 1))))
    if not any(p.splits[0] == "train" for p in parts):
        raise InputError(f"{folder / 'train_text.txt'}: file not found (every language needs a train split)")
    return parts


def _tsm_parquet(path: Path, root: Path) -> _Rows:
    table = _read_parquet(path)
    missing = [c for c in ("text", "label") if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: no column(s) {', '.join(missing)} (has: {', '.join(table.column_names)})")
    n = table.num_rows
    if n == 0:
        raise InputError(f"{path}: empty split, no examples")
    lines = list(range(1, n + 1))
    _require_values(table, ("text", "label"), str(path), lines, "row")
    folders = path.relative_to(root).parts[:-1] if path != root else ()
    language = next((p for p in folders if p in TSM_LANGUAGES), None)
    if language is None and "lang" in table.column_names:
        langs = table.column("lang").to_pylist()
    elif language is None:
        raise InputError(f"{path}: no language folder (like english/) in its path and no 'lang' column")
    else:
        langs = [language] * n
    split = _parquet_split(path, root)
    if split is None:
        raise InputError(f"{path}: no train/validation/test in its path")
    labels = [_tsm_label(v, str(path), "row", i) for i, v in enumerate(table.column("label").to_pylist(), start=1)]
    return _Rows(str(path), table.column("text").to_pylist(), labels, langs, [split] * n, lines, "row")


def read_tsm(path: str | Path, unseen=None) -> TaskData:
    """tweet_sentiment_multilingual from the xlm-t text layout or HF parquet files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory (expected {{language}}/{{split}}_text.txt or parquet)")
    parts: list[_Rows] = []
    notes: list[str] = []
    if path.is_dir() and (path / "train_text.txt").exists():
        parts = _tsm_text_files(path, path.name)
    elif path.is_dir() and any(path.glob("*/*_text.txt")):
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            if any(folder.glob("*_text.txt")) or any(folder.glob("*_labels.txt")):
                parts.extend(_tsm_text_files(folder, folder.name))
    else:
        files = _parquet_files(path)
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
    return _assemble("tsm", str(path), parts, labels=TSM_LABELS, unseen=unseen, english=ENGLISH["tsm"],
                     extra_notes=notes, same_splits_everywhere=True)


# ---------------------------------------------------------------------------------------------
# Generic files: jsonl, csv, parquet


def _generic_table(path: Path, columns: dict[str, str]) -> tuple[pa.Table, list[int], str, list[str]]:
    """(table with the wanted columns present in the file, row locations, unit, notes)."""
    wanted = [c for c in columns.values() if c]
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        raw = _read_bytes(path)
        # Text, language and split are strings; the label keeps its JSON type (string or integer).
        fields = {c: pa.string() for k, c in columns.items() if c and k != "label"}
        table, lines, blank = _read_jsonl(raw, str(path), fields, other_fields="infer")
        notes = [f"{path}: skipped {blank} blank line(s)"] if blank else []
        return table, lines, "line", notes
    if suffix in (".csv", ".tsv"):
        raw = _read_bytes(path)
        _decode(raw, str(path))
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
        table = _read_parquet(path)
        return table, list(range(1, table.num_rows + 1)), "row", []
    raise InputError(f"{path}: unknown file type {suffix or '(none)'}; expected .jsonl, .csv, .tsv or .parquet")


def _generic_rows(path: Path, columns: dict[str, str], split: str | None) -> _Rows:
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
    _require_values(table, required, str(path), lines, unit)
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
    texts = table.column(columns["text"]).cast(pa.string()).to_pylist()
    langs = table.column(columns["lang"]).cast(pa.string()).to_pylist()
    return _Rows(str(path), texts, labels, langs, splits, lines, unit, notes)


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
    return _assemble("file", str(path), parts, unseen=frozenset(unseen or ()), english=english,
                     extra_notes=notes, same_splits_everywhere=False)


def _column_names(path: Path) -> list[str]:
    """Column names of a generic file, cheaply (the first row of jsonl/csv, the parquet schema)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_columns(path)
    raw = _read_bytes(path)
    first = next((line for line in raw.split(b"\n") if line.strip()), b"")
    if suffix in (".csv", ".tsv"):
        return [c.strip().strip('"') for c in first.decode("utf-8", "replace").split("\t" if suffix == ".tsv" else ",")]
    try:
        obj = json.loads(first) if first else {}
    except json.JSONDecodeError:
        return []  # the full read reports the line
    return list(obj) if isinstance(obj, dict) else []


# ---------------------------------------------------------------------------------------------
# Assembly: raw rows -> label ids -> Splits


def _label_names(train_labels: list) -> tuple[str, ...]:
    values = set(train_labels)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return tuple(str(v) for v in sorted(values))
    if all(isinstance(v, str) for v in values):
        if all(re.fullmatch(r"-?\d+", v) for v in values):
            return tuple(sorted(values, key=int))
        return tuple(sorted(values))
    return tuple(sorted(str(v) for v in values))


def _assemble(name: str, source: str, parts: list[_Rows], *, labels: tuple[str, ...] | None = None,
              unseen: frozenset[str], english: str | None, extra_notes=(), same_splits_everywhere: bool) -> TaskData:
    if not parts:
        raise InputError(f"{source}: no examples found")
    notes = [note for p in parts for note in p.notes] + list(extra_notes)
    if labels is None:
        train = [v for p in parts for v, s in zip(p.labels, p.splits) if s == "train"]
        if not train:
            raise InputError(f"{source}: no train split (the label set is fixed by the train split)")
        labels = _label_names(train)
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


# ---------------------------------------------------------------------------------------------
# Specs

SPEC_HELP = "massive:PATH | tsm:PATH | file:PATH[?text=COL&label=COL&lang=COL&split=COL] | demo"
_OPTIONS = {
    "massive": {"unseen"},
    "tsm": {"unseen"},
    "file": {"text", "label", "lang", "split", "unseen", "english"},
}


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """'kind:PATH?k=v&k=v' -> (kind, path, options). A path that exists as written keeps its '?'."""
    kind, sep, rest = spec.partition(":")
    if kind == "demo" and not rest:
        return "demo", "", {}
    if not sep or kind not in _OPTIONS or not rest:
        raise InputError(f"dataset spec {spec!r}: expected {SPEC_HELP}")
    path, options = rest, {}
    if "?" in rest and not Path(rest).exists():
        path, _, query = rest.rpartition("?")
        options = dict(parse_qsl(query, keep_blank_values=True))
        unknown = sorted(set(options) - _OPTIONS[kind])
        if unknown:
            raise InputError(f"dataset spec {spec!r}: unknown option(s) {', '.join(unknown)} "
                             f"(allowed for {kind}: {', '.join(sorted(_OPTIONS[kind]))})")
    return kind, str(Path(path).expanduser()), options


def load_task(spec: str, *, cache_dir=None) -> TaskData:
    """Load a task from a short spec: massive:PATH, tsm:PATH, file:PATH?text=..&label=..&lang=.., demo.

    `unseen=a,b` overrides the unseen partition (checked against the dataset's languages).
    """
    kind, path, options = parse_spec(spec)
    if kind == "demo":
        from xlmr_mini.data.demo import build_demo

        return build_demo(cache_dir)
    unseen = options.pop("unseen", None)
    unseen = [u.strip() for u in unseen.split(",") if u.strip()] if unseen is not None else None
    if kind == "massive":
        return read_massive(path, unseen)
    if kind == "tsm":
        return read_tsm(path, unseen)
    return read_files(path, unseen=unseen, **options)
