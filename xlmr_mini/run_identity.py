"""A run's identity: what determines its result, not where its files lie.

`run_identity(cfg, teacher_dir)` is what a run directory's run.json holds and what a rerun is
compared with: the settings (`TrainConfig.identity()` without the input paths), the content of
the data files, and the content of the teacher's and the base's directories (config.json, the
weight files, tokenizer.json). Moving or renaming the data, the teacher or the output folder
keeps a run the same run; changing any of their files in place makes it another one.
`study_plan` keys its runs by the same pieces, a teacher that the study trains standing in as
its run's key, and `study_identity` says what a study's tables were made with.

Content is the sha256 of the bytes, cached by path, size and mtime in
`<cache dir>/fingerprints.json`: an unchanged file is read once, a moved one is hashed again under
its new path, a changed one (new size or mtime) is hashed again and changes the identity.
"""
import hashlib
import json
from pathlib import Path

from xlmr_mini.checkpoint import weight_files
from xlmr_mini.data import DEMO_VERSION, default_cache_dir, parse_spec
from xlmr_mini.data.batching import ENCODING_VERSION
from xlmr_mini.errors import InputError
from xlmr_mini.files import file_sha256
from xlmr_mini.train_config import TrainConfig

INPUTS = ("data", "teacher", "base")  # TrainConfig fields that are paths: identified by content
# Study overrides that do not change a result (as TrainConfig.identity ignores them).
RESULT_NEUTRAL = ("device", "num-threads", "cache-dir", "deterministic", "teacher-cache", "recompute")


def run_identity(cfg: TrainConfig, teacher_dir: str | Path | None) -> dict:
    """The identity of a training run; `teacher_dir` is the teacher it uses (the demo's own when
    none is given)."""
    cache = cfg.cache_dir
    return {**settings(cfg), "data": data_fingerprint(cfg.data, cache),
            "teacher": model_fingerprint(teacher_dir, cache), "base": model_fingerprint(cfg.base, cache)}


def input_paths(cfg: TrainConfig) -> dict[str, str | None]:
    """The run's inputs by flag (the data's path; None for the demo)."""
    data = parse_spec(cfg.data)[1] if not cfg.is_demo else None
    return {"--teacher": cfg.teacher, "--base": cfg.base, "--data": data or None}


def settings(cfg: TrainConfig) -> dict:
    """The run's settings without its input paths, as JSON would give them back."""
    return json.loads(json.dumps({k: v for k, v in cfg.identity().items() if k not in INPUTS}))


def study_identity(study, data: str, base: str) -> dict:
    """What a study's tables are made with: its settings (`study_plan.StudySettings`) without its
    paths, and the data's and base's fingerprints."""
    overrides = {k: v for k, v in study.overrides if k not in RESULT_NEUTRAL}
    return json.loads(json.dumps({"data": data, "base": base, "seeds": list(study.seeds), "precision": study.precision,
                                  "teacher_epochs": study.teacher_epochs, "overrides": overrides}))


def key(identity: dict) -> str:
    """A short hash of an identity (a run directory's name carries it)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def differences(old: dict, new: dict, limit: int = 3) -> str:
    """'name: A there, B now; ...' for the first `limit` entries that differ ('' if none)."""
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {_short(old.get(k))} there, {_short(new.get(k))} now" for k in diff[:limit])


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def data_fingerprint(spec: str | None, cache_dir=None) -> str:
    """'KIND[?OPTIONS] sha256:HASH tokens vN': the dataset's kind, reader options, content hash
    and tokenization rule (ENCODING_VERSION: the same texts and tokenizer.json gave other ids under
    an older rule); the built-in demo: its version."""
    kind, path, options = parse_spec(spec or "demo")
    if kind == "demo":
        return f"demo v{DEMO_VERSION}"
    root = Path(path)
    if not root.exists():
        raise InputError(f"--data {spec}: {root} does not exist")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    query = "&".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{kind}{'?' + query if query else ''} sha256:{_combined(root, files, cache_dir)} tokens v{ENCODING_VERSION}"


def model_fingerprint(path: str | Path | None, cache_dir=None) -> str | None:
    """'sha256:HASH' over a model directory's config.json, weight files and tokenizer.json."""
    if path is None:
        return None
    root = Path(path)
    if not (root / "config.json").is_file():
        raise InputError(f"{root}: no config.json (not a model directory)")
    files = [root / "config.json", *weight_files(root)]
    files += [root / "tokenizer.json"] if (root / "tokenizer.json").is_file() else []
    return f"sha256:{_combined(root, files, cache_dir)}"


def _combined(root: Path, files: list[Path], cache_dir) -> str:
    cache_file = Path(cache_dir or default_cache_dir()) / "fingerprints.json"
    lines = [f"{f.relative_to(root) if f != root else f.suffix}\t{file_sha256(f, cache_file)}" for f in files]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
