"""MASSIVE: the release directory (`1.1/data/{locale}.jsonl`), the release `.tar.gz` read in
place, or a Hugging Face parquet export (`{locale}/{split}/*.parquet`, `intent` as string or as
class id with the class names in the parquet's `huggingface` metadata).
"""
import tarfile
from pathlib import Path

import pyarrow as pa
from xlmr_mini.data.formats import (
    LOCALE_RE,
    SPLIT_ALIASES,
    Rows,
    assemble,
    hf_class_names,
    parquet_columns,
    parquet_files,
    parquet_split,
    read_bytes,
    read_jsonl,
    read_parquet,
    require_values,
    string_column,
)
from xlmr_mini.data.partitions import ENGLISH, MASSIVE_LOCALES, UNSEEN, check_partition
from xlmr_mini.data.task import TaskData
from xlmr_mini.errors import InputError

# ---------------------------------------------------------------------------------------------
# MASSIVE

_MASSIVE_FIELDS = {"locale": pa.string(), "partition": pa.string(), "utt": pa.string(), "intent": pa.string()}


def _massive_jsonl(raw: bytes, where: str) -> Rows:
    table, lines, blank = read_jsonl(raw, where, _MASSIVE_FIELDS)
    if table.num_rows == 0:
        raise InputError(f"{where}: empty file, no examples")
    require_values(table, _MASSIVE_FIELDS, where, lines, "line")
    partitions = table.column("partition").to_pylist()
    splits = []
    for partition, line in zip(partitions, lines):
        if partition not in ("train", "dev", "test"):
            raise InputError(f"{where} line {line}: partition {partition!r} is not train, dev or test")
        splits.append(partition)
    notes = [f"{where}: skipped {blank} blank line(s)"] if blank else []
    return Rows(where, table.column("utt").to_pylist(), table.column("intent").to_pylist(),
                 table.column("locale").to_pylist(), splits, lines, "line", notes)


def _massive_parquet(path: Path, root: Path) -> Rows:
    names = set(parquet_columns(path))
    missing = [c for c in ("utt", "intent") if c not in names]
    if missing:
        raise InputError(f"{path}: no column(s) {', '.join(missing)} (has: {', '.join(sorted(names))})")
    columns = [c for c in ("utt", "intent", "locale", "partition") if c in names]
    table = read_parquet(path, columns)
    n = table.num_rows
    if n == 0:
        raise InputError(f"{path}: empty split, no examples")
    lines = list(range(1, n + 1))
    require_values(table, columns, str(path), lines, "row")
    intents = table.column("intent").to_pylist()
    if pa.types.is_integer(table.schema.field("intent").type):
        class_names = hf_class_names(path, "intent")
        if class_names is None:
            raise InputError(f"{path}: integer 'intent' without class names in the parquet's huggingface metadata")
        for i, value in enumerate(intents):
            if not 0 <= value < len(class_names):
                raise InputError(f"{path} row {i + 1}: intent id {value} outside the {len(class_names)} class names")
        intents = [class_names[v] for v in intents]
    if "locale" in names:
        locales = string_column(table, "locale", str(path))
    else:
        locale = next((p for p in reversed(path.relative_to(root).parts[:-1]) if LOCALE_RE.match(p)), None) if path != root else None
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
        split = parquet_split(path, root)
        if split is None:
            raise InputError(f"{path}: no 'partition' column and no train/validation/test in its path")
        splits = [split] * n
    return Rows(str(path), string_column(table, "utt", str(path)), intents, locales, splits, lines, "row")


def read_massive(path: str | Path, unseen=None) -> TaskData:
    """MASSIVE from a release directory, a release .tar.gz, a single .jsonl, or parquet files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory (expected MASSIVE 1.1/data/, its .tar.gz, or parquet)")
    parts: list[Rows] = []
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
        parts.append(_massive_jsonl(read_bytes(path), str(path)))
    else:
        files = sorted(path.rglob("*.jsonl"))
        if files:
            parts = [_massive_jsonl(read_bytes(f), str(f)) for f in files]
        else:
            files = parquet_files(path)
            if not files:
                raise InputError(f"{path}: no MASSIVE .jsonl or .parquet files in this folder")
            parts = [_massive_parquet(f, path) for f in files]
    notes = []
    found = {lang for p in parts for lang in p.langs}
    strange = sorted(found - MASSIVE_LOCALES)
    if strange:
        notes.append(f"{path}: locale(s) {', '.join(strange)} are not MASSIVE 1.1 locales; counted as seen")
    unseen = check_partition(unseen, "massive", f"{path} unseen=") if unseen is not None else UNSEEN["massive"]
    return assemble("massive", str(path), parts, unseen=unseen, english=ENGLISH["massive"],
                     extra_notes=notes, same_splits_everywhere=True)
