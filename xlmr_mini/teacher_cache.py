"""The teacher's outputs computed once, kept on disk, and read back instead of running the teacher.

The teacher is frozen and in eval mode: what the KD loss reads of it (the logits, the embeddings,
the tapped layers' hidden states and attention maps, or Q and K for the fused path) is a function
of the example alone. A first pass (`build`) runs the teacher over the training split and stores
these per example, without padding, in flat files with offsets like `EncodedSplit`: example i of
a field is bytes [offset_i, offset_i+1) of `FIELD.bin`, shaped by its length n_i:

    logits [C]   embeddings [n, D]   hidden [L, n, D]   scores/probs [L, H, n, n]   q/k [L, H, n, d]

Every later epoch, every later seed and every later run with the same key reads them
(`TeacherCache.read`) and assembles the padded batch tensors the live teacher would have produced
(zeros at padded positions, which the masked loss never reads; TinyBERT's normalisation reads
them, so it runs with the live teacher). A run with a complete cache never loads the teacher.

The key is everything that determines the content: the teacher's weights and config (file
hashes), the tokenized split (its token ids in the full vocabulary and offsets: texts, tokenizer,
--max-length, subset, languages), the taps, the precision and the device type. Each field keeps
the dtype the teacher produces it in under the run's precision (under bf16 autocast: bf16 logits
and attention maps, fp32 embeddings and hidden states, which leave LayerNorm in fp32), so the loss
reads the same values as from the live teacher. The pass runs in length-sorted batches of a fixed
size: the content depends on the key alone, never on the run's flags, and a run with the cache
equals one without it within float rounding (a row's outputs differ from the live ones only by
the padding of the batch it was computed in).

Writes are atomic: the files go to a temporary directory that is renamed into place complete.
A directory that is incomplete, from another key, or damaged is removed and rebuilt, with one line
saying so; a temporary directory left by a killed build is removed by the next build.
"""
import dataclasses
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from xlmr_mini import distributed
from xlmr_mini.checkpoint import weight_files
from xlmr_mini.config import XLMRConfig
from xlmr_mini.data import EncodedSplit, default_cache_dir, epoch_batches
from xlmr_mini.data.batching import file_sha256
from xlmr_mini.errors import InputError
from xlmr_mini.files import atomic_write
from xlmr_mini.kd_step import bf16_frozen_linears, run_teacher
from xlmr_mini.model import Output, Taps, XLMRClassifier

CACHE_VERSION = 1
DISK_SHARE = 0.5  # auto: the cache may take at most this share of the free disk
BUILD_BATCH = 32  # examples per teacher forward in the build pass (fixed: the content is the key's alone)
LAYER_FIELDS = ("hidden", "scores", "probs", "q", "k")
_STORED = {torch.float32: ("float32", np.float32), torch.bfloat16: ("bfloat16", np.int16)}  # bf16: raw bits


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What determines a cache's content, and the sizes that shape its rows."""

    teacher: str  # sha256 of the teacher's config and weight files
    split: str  # sha256 of the split's token ids (full vocabulary) and offsets
    taps: Taps
    precision: str  # fp32 | bf16
    device: str  # the device type the teacher runs on (cpu, cuda): its kernels and autocast's dtypes
    hidden: int
    heads: int
    labels: int

    @property
    def key(self) -> str:
        text = json.dumps({"version": CACHE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def fields(self) -> tuple[str, ...]:
        t = self.taps
        chosen = {"embeddings": t.embeddings, "hidden": t.hidden, "scores": t.scores, "probs": t.probs,
                  "q": t.qk, "k": t.qk}
        return ("logits",) + tuple(name for name, on in chosen.items() if on)

    def row_shape(self, field: str, n: int) -> tuple[int, ...]:
        layers, heads, d = len(self.taps.layers), self.heads, self.hidden // self.heads
        return {"logits": (self.labels,), "embeddings": (n, self.hidden), "hidden": (layers, n, self.hidden),
                "scores": (layers, heads, n, n), "probs": (layers, heads, n, n),
                "q": (layers, heads, n, d), "k": (layers, heads, n, d)}[field]

    def offsets(self, field: str, lengths: np.ndarray) -> np.ndarray:
        """int64 [N + 1]: element offsets of each example's row in `field`'s file."""
        sizes = np.array([math.prod(self.row_shape(field, int(n))) for n in lengths], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def teacher_sha256(teacher_dir: Path) -> str:
    h = hashlib.sha256()
    for path in [teacher_dir / "config.json", *weight_files(teacher_dir)]:
        h.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return h.hexdigest()


def split_sha256(enc: EncodedSplit, kept: np.ndarray | None) -> str:
    """The split's content in the full vocabulary's ids (`kept`: the trimmed vocabulary's old ids),
    so trimmed and untrimmed runs share a cache (the trimmed teacher's lookups are the same rows)."""
    tokens = enc.tokens if kept is None else kept[enc.tokens]
    h = hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(enc.offsets, dtype=np.int64).tobytes())
    return h.hexdigest()


def field_dtypes(spec: CacheSpec, device) -> dict[str, torch.dtype]:
    """The dtype of each field as the teacher produces it: one forward of a tiny model with the
    same taps, frozen linears and precision (autocast's rules are the dtype's, not the sizes')."""
    cfg = XLMRConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=4, max_position_embeddings=8, id2label=("a", "b"))
    with torch.device("meta"):  # no draw from the global RNG: a run with a cache must draw as one without
        model = XLMRClassifier(cfg)
    model = model.to_empty(device=device).eval()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    bf16 = spec.precision == "bf16"
    if bf16:
        bf16_frozen_linears(model)
    ids = torch.tensor([[0, 3, 2]], device=device)
    out = run_teacher(model, dataclasses.replace(spec.taps, layers=(0,)), ids, torch.ones_like(ids), bf16)
    return {name: _first(out, name).dtype for name in spec.fields()}


def _first(out: Output, field: str) -> torch.Tensor:
    value = getattr(out, field)
    return value[0] if field in LAYER_FIELDS else value


def cache_bytes(spec: CacheSpec, lengths: np.ndarray, dtypes: dict[str, torch.dtype]) -> int:
    """The size of the cache's files, known before a byte is written."""
    return sum(int(spec.offsets(f, lengths)[-1]) * dtypes[f].itemsize for f in spec.fields())


def _meta(spec: CacheSpec, lengths: np.ndarray, dtypes: dict[str, torch.dtype]) -> dict:
    return {"version": CACHE_VERSION, "key": spec.key, "spec": dataclasses.asdict(spec),
            "examples": len(lengths), "lengths_sha256": hashlib.sha256(lengths.astype(np.int64).tobytes()).hexdigest(),
            "dtypes": {f: _STORED[dtypes[f]][0] for f in spec.fields()},
            "bytes": {f: int(spec.offsets(f, lengths)[-1]) * dtypes[f].itemsize for f in spec.fields()}}


def problem(path: Path, spec: CacheSpec, lengths: np.ndarray, dtypes: dict[str, torch.dtype]) -> str | None:
    """Why the directory `path` is not a complete cache for `spec` (None: it is one)."""
    if not path.exists():
        return "missing"
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "incomplete (no readable meta.json)"
    if meta.get("key") != spec.key:
        return f"built for another key ({meta.get('key')})"
    if meta != json.loads(json.dumps(_meta(spec, lengths, dtypes))):  # as read back (tuples become lists)
        return "its description disagrees with this run's split or precision"
    for field, size in meta["bytes"].items():
        file = path / f"{field}.bin"
        if not file.is_file() or file.stat().st_size != size:
            return f"damaged ({file.name} is not {size} bytes)"
    return None


class TeacherCache:
    """A complete cache: `read(index, length)` gives a batch's teacher `Output`."""

    def __init__(self, path: Path, spec: CacheSpec, lengths: np.ndarray, dtypes: dict[str, torch.dtype]):
        self.path, self.spec, self.lengths, self.dtypes = path, spec, lengths, dtypes
        self.bytes = cache_bytes(spec, lengths, dtypes)
        self.offsets = {f: spec.offsets(f, lengths) for f in spec.fields()}
        # Read with pread, not memory-mapped: mapped pages would count in the process's resident
        # memory, growing by the whole cache (gigabytes) over an epoch; read pages stay in the
        # kernel's page cache, shared and reclaimable.
        self.files = {f: os.open(path / f"{f}.bin", os.O_RDONLY) for f in spec.fields() if self.offsets[f][-1] > 0}

    def __del__(self):
        for fd in getattr(self, "files", {}).values():
            os.close(fd)

    def _row(self, field: str, i: int) -> torch.Tensor:
        start, end = self.offsets[field][i], self.offsets[field][i + 1]
        row = np.empty(end - start, dtype=_STORED[self.dtypes[field]][1])
        if os.preadv(self.files[field], [row], int(start) * row.itemsize) != row.nbytes:
            raise InputError(f"teacher cache {self.path / (field + '.bin')}: shorter than its meta.json says; remove "
                             f"it to rebuild")
        return torch.from_numpy(row).view(self.dtypes[field]).view(self.spec.row_shape(field, int(self.lengths[i])))

    def read(self, index: torch.Tensor, length: int, device) -> Output:
        """The teacher's outputs for examples `index` padded to `length` tokens, as the live teacher's
        forward returns them (per-layer lists of [B, ...] tensors, zeros at padded positions)."""
        rows = index.tolist()
        out = Output(logits=torch.stack([self._row("logits", i) for i in rows]).to(device))
        for field in self.spec.fields()[1:]:
            padded = self._padded(field, rows, length)
            setattr(out, field, list(padded.unbind(0)) if field in LAYER_FIELDS else padded[0])
        return out if torch.device(device).type == "cpu" else _to(out, device)

    def _padded(self, field: str, rows: list[int], length: int) -> torch.Tensor:
        """[L, B, ...] (L = 1 for the embeddings), each row's values in its top-left corner."""
        shape = self.spec.row_shape(field, length)
        shape = shape if field in LAYER_FIELDS else (1, *shape)
        batch = torch.zeros((shape[0], len(rows), *shape[1:]), dtype=self.dtypes[field])
        for j, i in enumerate(rows):
            row = self._row(field, i)
            row = row if field in LAYER_FIELDS else row[None]
            batch[(slice(None), j, *(slice(0, s) for s in row.shape[1:]))] = row
        return batch


def _to(out: Output, device) -> Output:
    move = lambda xs: [x.to(device, non_blocking=True) for x in xs]  # noqa: E731
    return dataclasses.replace(out, logits=out.logits.to(device), hidden=move(out.hidden), scores=move(out.scores),
                               probs=move(out.probs), q=move(out.q), k=move(out.k),
                               embeddings=None if out.embeddings is None else out.embeddings.to(device))


def build(path: Path, spec: CacheSpec, enc: EncodedSplit, dtypes: dict[str, torch.dtype], teacher: XLMRClassifier,
          pad_id: int, device) -> None:
    """Run `teacher` over `enc` (length-sorted batches of `BUILD_BATCH`) and write the cache to
    `path` atomically: a temporary directory beside it, renamed into place when complete."""
    _remove_stale_builds(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(tmp, spec, enc, dtypes, teacher, pad_id, device)
        atomic_write(tmp / "meta.json", json.dumps(_meta(spec, enc.lengths, dtypes), indent=1) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(tmp: Path, spec: CacheSpec, enc: EncodedSplit, dtypes, teacher, pad_id: int, device) -> None:
    offsets = {f: spec.offsets(f, enc.lengths) for f in spec.fields()}
    # pwrite, not a writable memory map, whose dirty pages would all count in this process's memory.
    files = {f: os.open(tmp / f"{f}.bin", os.O_WRONLY | os.O_CREAT, 0o644) for f in spec.fields()}
    bf16 = spec.precision == "bf16"
    try:
        for batch in epoch_batches(enc, BUILD_BATCH, seed=0, epoch=0, shuffle=False, pad_id=pad_id,
                                   sort_by_length=True):
            mask = batch["attention_mask"].to(device)
            out = run_teacher(teacher, spec.taps, batch["input_ids"].to(device), mask, bf16)
            for j, i in enumerate(batch["index"].tolist()):
                n = int(enc.lengths[i])
                for field, fd in files.items():
                    row = _example_row(out, field, j, n).cpu().contiguous()
                    bits = row.reshape(-1).view(_bits(row.dtype)).numpy()
                    os.pwrite(fd, bits.tobytes(), int(offsets[field][i]) * bits.itemsize)
        for fd in files.values():
            os.fsync(fd)
    finally:
        for fd in files.values():
            os.close(fd)


def _bits(dtype: torch.dtype) -> torch.dtype:
    return torch.int16 if dtype == torch.bfloat16 else dtype


def _example_row(out: Output, field: str, j: int, n: int) -> torch.Tensor:
    """Row j of a batch's `field` without its padding, in the stored shape."""
    if field == "logits":
        return out.logits[j]
    if field == "embeddings":
        return out.embeddings[j, :n]
    per_layer = [x[j] for x in getattr(out, field)]  # [n_pad, D] or [H, T, T] or [H, T, d]
    if field == "hidden":
        return torch.stack([x[:n] for x in per_layer])
    if field in ("scores", "probs"):
        return torch.stack([x[:, :n, :n] for x in per_layer])
    return torch.stack([x[:, :n] for x in per_layer])


def _remove_stale_builds(path: Path) -> None:
    """Temporary directories of builds of this key whose process is gone (killed mid-write)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name.split(".")[-2]
        if pid.isdigit() and not _alive(int(pid)):
            print(f"teacher cache: removing {tmp.name}, the incomplete build of a process that stopped")
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# A run's cache: --teacher-cache auto|on|off
# ---------------------------------------------------------------------------------------------
def for_run(cfg, setup, teacher_cfg: XLMRConfig, taps: Taps, bf16: bool, device, total_steps: int,
            load_teacher, shared: bool = False) -> TeacherCache | None:
    """The teacher cache of a KD run (`cfg` a TrainConfig, `setup` its run_setup.Setup): a complete
    one as it is; else built now with `load_teacher()` (the frozen teacher) when --teacher-cache
    says so; None when the run computes the teacher's outputs live (auto says why in one line).
    `shared`: other runs will read it (the study's cache stage), so auto builds it if it fits."""
    if cfg.teacher_cache == "off":
        return None
    if cfg.loss_norm == "tinybert":
        return _refuse(cfg.teacher_cache, "--loss-norm tinybert reads the teacher at padded positions, which the "
                                          "cache does not keep")
    enc = setup.splits["train"]
    spec = CacheSpec(teacher=teacher_sha256(setup.teacher_dir),
                     split=split_sha256(enc, None if setup.vocab is None else setup.vocab.kept), taps=taps,
                     precision="bf16" if bf16 else "fp32", device=torch.device(device).type,
                     hidden=teacher_cfg.hidden_size, heads=teacher_cfg.num_attention_heads,
                     labels=teacher_cfg.num_labels)
    directory = cache_directory(cfg)
    reused = shared or total_steps > math.ceil(len(enc) / cfg.batch_size) or len(cfg.seeds) > 1
    return open_cache(directory / spec.key, spec, enc, device, cfg.teacher_cache, reused, load_teacher,
                      teacher_cfg.pad_token_id)


def cache_directory(cfg) -> Path:
    return Path(cfg.teacher_cache_dir or Path(cfg.cache_dir or default_cache_dir()) / "teacher")


def open_cache(path: Path, spec: CacheSpec, enc: EncodedSplit, device, mode: str, reused: bool, load_teacher,
               pad_id: int) -> TeacherCache | None:
    """`path`'s cache, built first if it is not complete and `mode` and the free disk allow (auto:
    only when it will be `reused`, by a second epoch or another seed)."""
    dtypes = field_dtypes(spec, device)
    why = problem(path, spec, enc.lengths, dtypes)
    if why is None:
        return TeacherCache(path, spec, enc.lengths, dtypes)
    size, free = cache_bytes(spec, enc.lengths, dtypes), free_bytes(path.parent)
    if mode == "auto" and not reused:
        return _refuse(mode, "the run reads the training data once and shares its teacher with no other run; "
                             "--teacher-cache on keeps the teacher's outputs for later runs")
    if mode == "auto" and size > DISK_SHARE * free:
        return _refuse(mode, f"it needs {size_text(size)}, more than {DISK_SHARE:.0%} of the {size_text(free)} free "
                             f"in {path.parent}")
    if size > free:
        raise InputError(f"--teacher-cache on: the teacher cache needs {size_text(size)}, more than the "
                         f"{size_text(free)} free in {path.parent}; give --teacher-cache-dir on a larger disk, or use "
                         f"--teacher-cache off")
    if why != "missing":
        print(f"teacher cache: {path} is {why}; rebuilding it")
    print(f"teacher cache: computing the teacher's outputs for {len(enc)} examples once ({size_text(size)} in {path})")

    def build_cache():
        build(path, spec, enc, dtypes, load_teacher(), pad_id, device)

    distributed.on_main(build_cache)
    return TeacherCache(path, spec, enc.lengths, dtypes)


def _refuse(mode: str, reason: str) -> None:
    if mode == "on":
        raise InputError(f"--teacher-cache on: {reason}; use --teacher-cache off")
    print(f"teacher cache: off ({reason})")


def free_bytes(directory: Path) -> int:
    path = Path(directory).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def size_text(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
