"""Dataset specs: `massive:PATH`, `tsm:PATH`, `file:PATH?text=..&label=..&lang=..`, `demo` -> a `TaskData`.

The readers, one per dataset, are `massive`, `tsm` and `generic` (what they share is in
`formats`). Everything is read with pyarrow. Bad input raises `InputError` naming the file and,
where there is one, the line. Nothing is dropped silently: blank jsonl lines and skipped parquet
configs are counted in `TaskData.notes`.
"""
from pathlib import Path
from urllib.parse import parse_qsl

from xlmr_mini.data.generic import read_files
from xlmr_mini.data.massive import read_massive
from xlmr_mini.data.task import TaskData
from xlmr_mini.data.tsm import read_tsm
from xlmr_mini.errors import InputError

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
