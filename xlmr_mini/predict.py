"""Classify a file of texts with a saved model: `python -m xlmr_mini.predict`.

    python -m xlmr_mini.predict --model runs/student/best --input tweets.csv --out predictions.jsonl

Reads jsonl, csv/tsv or parquet (the text in `--text-column`, default "text") or plain text (.txt,
one text per line) and writes one record per input row, in input order: the predicted label and
its probability, with `--all-scores` every label's probability, as jsonl (or csv when --out ends
in .csv). A row without usable text (missing, null, not a string, empty, a line that is not JSON)
gets one line on stderr and a record with an "error" instead of a label. A file that cannot be
read is one line and exit code 2, before anything is written. Texts are tokenized as in training,
truncated to --max-length and run in length-sorted batches (the scores `evaluate` and `check` give).
"""
import csv
import dataclasses
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from xlmr_mini.checkpoint import check_model_dir, check_tokenizer, find_tokenizer, load_model
from xlmr_mini.config import check_max_length
from xlmr_mini.data import Split, default_cache_dir, encode_split
from xlmr_mini.data.formats import read_bytes, read_parquet, string_column, text_lines
from xlmr_mini.errors import InputError, OneLineErrorParser, cli_main
from xlmr_mini.files import atomic_write, check_output_dir, check_output_file
from xlmr_mini.hardware import PRECISIONS, resolve_device, resolve_precision
from xlmr_mini.inference import predict_logits
from xlmr_mini.progress import Progress
from xlmr_mini.tokenizer import Tokenizer

INPUT_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv",
               ".parquet": "parquet", ".txt": "txt"}
OUTPUT_TYPES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
MISSING = object()
DEFAULT_MAX_LENGTH = 128


@dataclasses.dataclass(frozen=True)
class Row:
    """One input row: where it is ("line 3", "row 3"), its text, or why it has none."""

    place: str
    text: str | None
    problem: str | None = None


def _parser() -> OneLineErrorParser:
    p = OneLineErrorParser(prog="python -m xlmr_mini.predict", description=__doc__.split("\n\n")[2])
    p.add_argument("--model", type=Path, required=True, help="HF model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--input", type=Path, required=True, help="texts: .jsonl, .csv, .tsv, .parquet or .txt (one text per line)")
    p.add_argument("--text-column", default="text", help="the column (jsonl key) holding the text (default: text)")
    p.add_argument("--out", type=Path, required=True, help="predictions, one record per input row: .jsonl or .csv")
    p.add_argument("--all-scores", action="store_true", help="also write every label's probability")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    p.add_argument("--max-length", type=int, help="tokens per text incl. <s> </s>; longer texts are truncated "
                   "(default: 128 as in train and evaluate, or the model's positions if fewer)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="bf16 autocast where this hardware runs it faster (auto, as train), or fp32 / bf16 (default: auto)")
    p.add_argument("--cache-dir", type=Path, help="cache for the bf16 speed probe (default: ~/.cache/xlmr_mini)")
    return p


def _check_args(args) -> None:
    """What the flags alone must satisfy, checked before any work."""
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.max_length is not None:
        check_max_length(args.max_length)
    if INPUT_TYPES.get(args.input.suffix.lower()) is None:
        raise InputError(f"--input {args.input}: unknown file type {args.input.suffix or '(none)'}; "
                         f"expected .jsonl, .csv, .tsv, .parquet or .txt")
    if OUTPUT_TYPES.get(args.out.suffix.lower()) is None:
        raise InputError(f"--out {args.out}: unknown file type {args.out.suffix or '(none)'}; expected .jsonl or .csv")
    if args.out.resolve() == args.input.resolve():
        raise InputError(f"--out {args.out}: is the input file; give another name")
    check_output_file(args.out, "--out")
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir, "--cache-dir")


def _checked(place: str, value) -> Row:
    if value is MISSING:
        return Row(place, None, "no text field")
    if value is None:
        return Row(place, None, "the text is null")
    if not isinstance(value, str):
        return Row(place, None, f"the text is a {type(value).__name__}, not a string")
    if not value.strip():
        return Row(place, None, "empty text")
    return Row(place, value)


def _jsonl_rows(path: Path, column: str) -> list[Row]:
    rows, has_column = [], False
    for number, line in enumerate(text_lines(read_bytes(path), str(path)), 1):
        if not line.strip():
            continue
        place = f"line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(Row(place, None, f"not valid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict):
            rows.append(Row(place, None, "not a JSON object"))
            continue
        has_column |= column in obj
        rows.append(_checked(place, obj.get(column, MISSING)))
    if rows and not has_column:
        raise InputError(f"{path}: no line has a {column!r} field (set --text-column)")
    return rows


def _csv_rows(path: Path, column: str) -> list[Row]:
    text = "\n".join(text_lines(read_bytes(path), str(path)))
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        if reader.fieldnames is None:
            return []
        if column not in reader.fieldnames:
            raise InputError(f"{path}: no column {column!r} in the header {reader.fieldnames} (set --text-column)")
        return [Row(f"row {number}", None, "more fields than the header") if None in row
                else _checked(f"row {number}", row[column] if row[column] is not None else MISSING)
                for number, row in enumerate(reader, 1)]
    except csv.Error as e:
        raise InputError(f"{path}: cannot parse csv ({e})") from None


def _parquet_rows(path: Path, column: str) -> list[Row]:
    table = read_parquet(path)
    if column not in table.column_names:
        raise InputError(f"{path}: no column {column!r} among {table.column_names} (set --text-column)")
    return [_checked(f"row {number}", value) for number, value in enumerate(string_column(table, column, str(path)), 1)]


def read_rows(path: Path, column: str) -> list[Row]:
    """Every row of an input file, in order, with its text or why it has none."""
    kind = INPUT_TYPES[path.suffix.lower()]
    if kind == "txt":
        rows = [_checked(f"line {n}", line) for n, line in enumerate(text_lines(read_bytes(path), str(path)), 1)]
    else:
        rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[kind](path, column)
    if not rows:
        raise InputError(f"{path}: no rows to classify")
    return rows


def _records(rows: list[Row], probs: np.ndarray, labels: tuple[str, ...], all_scores: bool) -> list[dict]:
    """One output record per input row: label and probability, or the row's problem."""
    records, good = [], iter(probs)
    for row in rows:
        if row.text is None:
            records.append({"label": None, "score": None, "error": row.problem})
            continue
        p = next(good)
        k = int(p.argmax())
        record = {"label": labels[k], "score": float(p[k])}
        if all_scores:
            record["scores"] = {name: float(x) for name, x in zip(labels, p)}
        records.append(record)
    return records


def _csv_text(records: list[dict], labels: tuple[str, ...], all_scores: bool) -> str:
    header = ["label", "score", *(f"score_{name}" for name in labels if all_scores), "error"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for r in records:
        scores = [r.get("scores", {}).get(name) for name in labels] if all_scores else []
        writer.writerow(["" if v is None else v for v in (r["label"], r["score"], *scores, r.get("error"))])
    return out.getvalue()


def write_records(path: Path, records: list[dict], labels: tuple[str, ...], all_scores: bool) -> None:
    if OUTPUT_TYPES[path.suffix.lower()] == "csv":
        atomic_write(path, _csv_text(records, labels, all_scores))
    else:
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _model(args):
    """(model on its device, its tokenizer, precision), each checked against the flags."""
    device = resolve_device(args.device)
    model = load_model(check_model_dir(args.model, "--model"), device=device).eval()
    if args.max_length is None:
        args.max_length = min(DEFAULT_MAX_LENGTH, model.cfg.max_tokens)
    check_max_length(args.max_length, model.cfg)
    tok_file = find_tokenizer(args.model)
    if tok_file is None:
        raise InputError(f"--model {args.model}: no tokenizer.json in the model directory")
    tokenizer = Tokenizer(tok_file)
    check_tokenizer(tokenizer.vocab_size, tok_file, model.cfg, str(args.model))
    precision = resolve_precision(args.precision, device, model.cfg.hidden_size, args.cache_dir or default_cache_dir())
    return model, tokenizer, precision


@cli_main
def main(argv=None) -> list[dict]:
    args = _parser().parse_args(argv)
    _check_args(args)
    rows = read_rows(args.input, args.text_column)
    model, tokenizer, precision = _model(args)
    for row in rows:
        if row.text is None:
            print(f"warning: {args.input} {row.place}: {row.problem}; no prediction", file=sys.stderr)
    texts = [row.text for row in rows if row.text is not None]
    split = Split(texts=texts, labels=np.zeros(len(texts), dtype=np.int64), langs=[""] * len(texts))
    enc = encode_split(split, tokenizer, args.max_length, cache_dir=False)
    progress = Progress(math.ceil(len(texts) / args.batch_size), label="predict")
    logits = predict_logits(model, enc, args.batch_size, precision == "bf16", progress)
    progress.close()
    probs = torch.from_numpy(logits).softmax(-1).numpy()
    records = _records(rows, probs, model.cfg.id2label, args.all_scores)
    write_records(args.out, records, model.cfg.id2label, args.all_scores)
    print(f"predicted {len(texts):,} texts ({len(rows) - len(texts):,} rows without text) with {args.model} "
          f"({precision}); wrote {args.out}")
    return records


if __name__ == "__main__":
    main()
