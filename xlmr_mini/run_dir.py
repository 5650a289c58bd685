"""The run directory: out-dir claims, locks and same-run checks, the training checkpoint, metrics.jsonl.

    out/run.json         the run's identity (`run_identity`: settings and input content), compared
                         with every later command on this --out
    out/metrics.jsonl    one record per --logging-steps training steps (their means) and per evaluation
    out/results.json     final numbers and the full configuration
    out/best/            the best model on dev, an HF directory
    out/checkpoint/      model, projection, optimizer, scheduler, RNG (every rank's) and step (for
                         --resume); the data order is a function of (seed, epoch), so the step is
                         the data position. A finished run removes it unless --keep-checkpoint.
    out/tensorboard/     the same records as TensorBoard events (--report-to tensorboard)

Every write is atomic: a crash leaves the previous file or checkpoint, never half of one. A
process writing a run holds `.<out name>.lock` beside it; with --overwrite the new run is written
in `.<out name>.overwrite` and replaces the old one only once it is complete.
"""
import dataclasses
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import IO

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xlmr_mini.checkpoint import hf_state_dict, save_hf
from xlmr_mini.errors import InputError
from xlmr_mini.files import atomic_write, disk_space, readable, reports_full_disk
from xlmr_mini.kd_step import StepContext
from xlmr_mini.run_identity import differences
from xlmr_mini.train_config import TrainConfig
from xlmr_mini.vocab import expand_state_dict, full_config, trim_tokenizer


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


class MetricsLog:
    """Append-only JSONL, one record per line, flushed as written; with no path (a rank other than
    0 under torchrun) it writes nothing. `board`: a `TensorBoardLog` that gets every record too."""

    def __init__(self, path: Path | None, board: "TensorBoardLog | None" = None):
        self.file = open(path, "a", encoding="utf-8") if path is not None else None
        self.board = board

    def write(self, record: dict) -> None:
        if self.file is not None:
            with disk_space(self.file.name):
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
        if self.board is not None:
            self.board.write(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.writer.close()


class TensorBoardLog:
    """metrics.jsonl's records as TensorBoard scalars: train/<term> (loss, its terms, lr, samples/s)
    and <split>/micro_f1, <split>/macro_f1 per evaluation. A resumed run purges the events after
    its checkpoint's step, as metrics.jsonl drops those records."""

    def __init__(self, path: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter  # the [tensorboard] extra

        self.writer = SummaryWriter(str(path), purge_step=purge_step or None)

    def write(self, record: dict) -> None:
        step = record["step"]
        if record["type"] == "train":
            for key in ("loss", "lr", "samples_per_s", *record.get("share", {})):
                self.writer.add_scalar(f"train/{key}", record[key], step)
        else:
            for key in ("micro_f1", "macro_f1"):
                self.writer.add_scalar(f"{record['split']}/{key}", record["overall"][key], step)
        self.writer.flush()


def metrics_writer(path: Path, keep_through: int, tensorboard: bool = False) -> MetricsLog:
    """Open metrics.jsonl for appending, first dropping records after step `keep_through` (written
    after the checkpoint a resumed run starts from, so they will be written again); with
    `tensorboard`, also <run>/tensorboard/."""
    kept = []
    if path.is_file() and keep_through > 0:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if record.get("step", 0) <= keep_through and not record.get("final"):
                kept.append(line)
    atomic_write(path, "".join(x + "\n" for x in kept))
    return MetricsLog(path, TensorBoardLog(path.parent / "tensorboard", keep_through) if tensorboard else None)


def rng_state(device: torch.device) -> dict:
    """The CPU generator's state, and the generator of `device` when it is a GPU: that device's
    alone, so a run resumes with another number of visible GPUs (torchrun on 8, resumed on 1)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


@reports_full_disk
def save_checkpoint(path: Path, ctx: StepContext, progress: dict, rng: list[dict]) -> None:
    """Write the training state into a fresh directory, then swap it in with renames: a crash
    leaves the previous checkpoint (or, between the two renames, `.checkpoint.old`, which
    `load_checkpoint` also accepts). `rng`: every rank's `rng_state`."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"student.{k}": v.detach().contiguous().cpu() for k, v in ctx.student.state_dict().items()}
    if ctx.proj is not None:
        tensors.update({f"proj.{k}": v.detach().contiguous().cpu() for k, v in ctx.proj.state_dict().items()})
    if ctx.vocab is not None:
        tensors["vocab.kept"] = torch.from_numpy(ctx.vocab.kept)
    save_file(tensors, str(tmp / "model.safetensors"))
    torch.save({"optimizer": ctx.optimizer.state_dict(), "scheduler": ctx.scheduler.state_dict(), "rng": rng[0],
                "rank_rng": rng}, tmp / "training_state.pt")
    write_json(tmp / "progress.json", progress)  # written last: its presence marks a complete checkpoint
    _swap_in(tmp, path)


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace the directory `path` by `tmp` with renames, the old one moved to `.NAME.old` first."""
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, ctx: StepContext, device, rank: int = 0, world_size: int = 1) -> dict:
    """Restore model, projection, optimizer, scheduler and RNG from `path`; returns the progress.
    Each rank takes its own RNG state when the checkpoint has one per rank of this world size
    (else rank 0's: resuming on another number of processes changes only dropout's draws)."""
    if not (path / "progress.json").is_file():
        old = path.with_name(f".{path.name}.old")
        if not (old / "progress.json").is_file():
            raise InputError(f"--resume: {path} is not a complete checkpoint")
        path = old
    advice = "pass --overwrite to start the run over (or restore the file)"
    with readable(path / "model.safetensors", advice):
        tensors = load_file(str(path / "model.safetensors"), device=str(device))
    kept = tensors.pop("vocab.kept", None)
    if (kept is None) != (ctx.vocab is None) or (kept is not None and not np.array_equal(kept.cpu().numpy(), ctx.vocab.kept)):
        raise InputError(f"--resume: {path} was trained on another vocabulary (the data, tokenizer or --no-trim changed)")
    with readable(path / "model.safetensors", advice):
        ctx.student.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")})
        if ctx.proj is not None:
            ctx.proj.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("proj.")})
    with readable(path / "training_state.pt", advice):
        state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        ctx.optimizer.load_state_dict(state["optimizer"])
        ctx.scheduler.load_state_dict(state["scheduler"])
        ranks = state.get("rank_rng", [])
        rng = ranks[rank] if len(ranks) == world_size else state["rng"]
        restore_rng(rng, torch.device(device))
    with readable(path / "progress.json", advice):
        return json.loads((path / "progress.json").read_text(encoding="utf-8"))


def save_best(path: Path, ctx: StepContext, tokenizer_file: Path, save_vocab: str, untouched_scale: float) -> None:
    """Write the student as an HF directory. A student trained on a trimmed vocabulary is written
    with the full one (`save_vocab` "full": the rows it never trained at their initial values
    times `untouched_scale`, the teacher's tokenizer) or as it is ("task", a trimmed tokenizer)."""
    cfg, state = ctx.student.cfg, hf_state_dict(ctx.student)
    if ctx.vocab is None:
        save_hf(path, cfg, state, tokenizer_file)
    elif save_vocab == "full":
        save_hf(path, full_config(cfg, ctx.vocab), expand_state_dict(state, ctx.vocab, untouched_scale), tokenizer_file)
    else:
        save_hf(path, cfg, state, trim_tokenizer(json.loads(Path(tokenizer_file).read_text(encoding="utf-8")), ctx.vocab))


def remove_checkpoint(path: Path) -> None:
    """Remove a finished run's checkpoint (and a crash's leftovers of one)."""
    for entry in (path, path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")):
        shutil.rmtree(entry, ignore_errors=True)


def publish_best(source: Path, path: Path) -> None:
    """Make `path` a copy of the model directory `source` (hard links where the file system has
    them: the files are never rewritten in place), swapped in with renames like a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=_link_or_copy)
    _swap_in(tmp, path)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


RUN_FILES = ("run.json", "metrics.jsonl", "results.json", "best", "checkpoint", ".checkpoint.tmp", ".checkpoint.old",
             ".best.tmp", ".best.old", "tensorboard")


def _is_run_file(entry: Path) -> bool:
    return entry.name in RUN_FILES or entry.name.startswith("seed-")


def clear_run(out: Path) -> None:
    """Remove a previous run's files from `out` (only those this command writes)."""
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir()):
        if not _is_run_file(entry):
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def default_out(cfg: TrainConfig) -> Path:
    data = "demo" if cfg.is_demo else cfg.data.split(":", 1)[0]
    layers = f"-{cfg.layers}L" if cfg.layers else ""
    return Path("runs") / f"{data}-{cfg.init}{layers}-{'nokd' if cfg.no_kd else 'kd'}"


@dataclasses.dataclass
class Claim:
    """An output directory claimed by this process (`lock` held until `release`). `work` is where
    the run is written: `out` itself, or a sibling while --overwrite replaces a run in `out`
    (`replace_run` swaps it in). `finished`: `out` already holds this run, finished."""

    out: Path
    work: Path
    finished: bool
    lock: IO

    def finish(self) -> None:
        """Once the run in `work` is complete (or stopped with a checkpoint), put it in `out`."""
        if self.work != self.out:
            replace_run(self.work, self.out)

    def release(self) -> None:
        self.lock.close()


def _sibling(out: Path, role: str) -> Path:
    return out.with_name(f".{out.name}.{role}")


def claim_out(cfg: TrainConfig, out: Path, identity: dict) -> Claim:
    """Lock `out` for this run and check that it is free for it (or holds it: finished, or to
    resume); write run.json. Nothing is deleted here but an unstarted run's leftovers."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    out = out.resolve()
    lock = _lock(out)
    try:
        if not out.exists() and _sibling(out, "replaced").exists() and _sibling(out, "overwrite").exists():
            replace_run(_sibling(out, "overwrite"), out)  # a swap cut short: the new run is complete
        work, finished = out, False
        if cfg.overwrite and out.is_dir() and any(map(_is_run_file, out.iterdir())):
            work = _sibling(out, "overwrite")
            shutil.rmtree(work, ignore_errors=True)
        elif (out / "run.json").is_file():
            with readable(out / "run.json", "pass --overwrite to start the run over, or choose another --out"):
                previous = json.loads((out / "run.json").read_text(encoding="utf-8"))
            finished = _check_same_run(cfg, out, previous, identity)
        elif out.is_dir() and any((out / name).exists() for name in ("checkpoint", "best", "metrics.jsonl", "results.json")):
            raise InputError(f"--out {out}: holds training output without run.json; pass --overwrite to replace it")
        work.mkdir(parents=True, exist_ok=True)
        if not finished:
            write_json(work / "run.json", {"identity": identity})
        return Claim(out=out, work=work, finished=finished, lock=lock)
    except BaseException:
        lock.close()
        raise


def _lock(out: Path) -> IO:
    """An exclusive lock on `.<name>.lock` beside `out` (beside it, so that swapping `out` keeps
    it): a second process writing the same run stops with one line; the lock ends with the process."""
    path = _sibling(out, "lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise InputError(f"--out {out}: cannot create its lock file {path} ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise InputError(f"--out {out}: another process{f' (pid {holder})' if holder else ''} is writing this run; "
                         f"wait for it to end or choose another --out") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def _check_same_run(cfg: TrainConfig, out: Path, previous: dict, identity: dict) -> bool:
    """True when `out` holds this run finished; raises when it holds another run, or this one
    unfinished without --resume."""
    shown = differences(previous.get("identity", {}), identity)
    if shown:
        raise InputError(f"--out {out}: holds a different run ({shown}); choose another --out or pass --overwrite")
    if (out / "results.json").is_file():
        return True
    started = any(out.glob("**/checkpoint")) or any(out.glob("seed-*/results.json"))
    if started and not cfg.resume:
        raise InputError(f"--out {out}: holds an unfinished run of these settings; pass --resume to continue it "
                         f"or --overwrite to start over")
    if not started:
        clear_run(out)  # a run stopped before its first checkpoint: nothing to keep
    return False


def replace_run(work: Path, out: Path) -> None:
    """Put the run written in `work` in place of the one in `out`: the old run is removed only
    after the new one has taken its place; files in `out` that no run writes are kept."""
    old = _sibling(out, "replaced")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(work, out)
    for entry in sorted(old.iterdir()) if old.is_dir() else []:
        if not _is_run_file(entry) and not (out / entry.name).exists():
            os.replace(entry, out / entry.name)
    shutil.rmtree(old, ignore_errors=True)


def seed_dirs(cfg: TrainConfig, out: Path) -> list[tuple[int, Path]]:
    return [(s, out if len(cfg.seeds) == 1 else out / f"seed-{s}") for s in cfg.seeds]
