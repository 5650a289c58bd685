"""Fine-tune a teacher, or initialize a student and train it with or without distillation.

    python -m xlmr_mini.train --init from-teacher                 # the built-in demo, a few minutes
    python -m xlmr_mini.train --init from-base --base XLMR_DIR --layers 12 --no-kd --data tsm:PATH
    python -m xlmr_mini.train --init from-teacher --teacher TEACHER_DIR --layers 6 --data tsm:PATH

One run = one seed: initialize (paper §2.2, `copy_weights.init_student`), train with
`kd_loss` (§2.1) or cross-entropy only (`--no-kd`), evaluate on dev every `--eval-steps`, keep the
best by dev macro-F1 in `best/` (an HF directory), and finally score it on test (dev if the data
has no test split). The setup follows the paper's §3.1: AdamW with transformers' defaults
(lr 5e-5, betas 0.9/0.999, eps 1e-8, no weight decay, gradient norm clipped at 1.0 as the
transformers Trainer does), linear decay to 0 with no warm-up, 30 epochs.

Output directory: run.json (the settings that define the run), metrics.jsonl (one record per
training step and per evaluation), results.json, best/, checkpoint/ (model, projection, optimizer,
scheduler, RNG and step; the data order is a function of (seed, epoch), so the step is the data
position). With several `--seeds` each seed gets `seed-N/` and the top results.json holds the mean
and spread.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xlmr_mini.checkpoint import build_model, find_tokenizer, load_model, save_model
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import INITS, StudentSpec, init_student, layer_map, scratch_state_dict, student_config
from xlmr_mini.data import (
    DEMO_VERSION, EncodedSplit, TaskData, default_cache_dir, encode_split, epoch_batches, load_task,
    select_languages, stratified_subset,
)
from xlmr_mini.errors import InputError, cli_main
from xlmr_mini.files import atomic_write
from xlmr_mini.evaluate import OneLineErrorParser, evaluate, final_split, label_ids, resolve_device, to_model_labels
from xlmr_mini.kd_loss import ATT_TARGETS, HID_PROJS, IMPLS, HiddenProjection, KDLossConfig, kd_loss, kd_taps
from xlmr_mini.metrics import format_table, summarize_seeds
from xlmr_mini.model import XLMRClassifier
from xlmr_mini.tokenizer import Tokenizer

DEMO_EPOCHS = 8
DEMO_LR = 1e-3
# The demo teacher: from scratch, about a minute on one CPU core, dev macro-F1 ~0.78. Trained from
# random weights it needs the warm-up and many epochs (a 4-layer one learns far slower at this data
# size; lr 2e-3 does not take off). Its 1-layer students distil in ~15 s.
DEMO_TEACHER = dict(layers=2, hidden=128, heads=4, intermediate=512, epochs=60, lr=1e-3, warmup_ratio=0.1)
PAPER_EPOCHS = 30
# The demo's models are tiny: one thread beats two (thread sync costs more than the matmuls, ~10x
# slower on a busy 2-core machine).
DEMO_THREADS = 1


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where and what was kept."""


# ---------------------------------------------------------------------------------------------
# Files: JSON, metrics.jsonl, the training checkpoint, a progress bar
# ---------------------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


class MetricsLog:
    """Append-only JSONL, one record per line, flushed as written."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def metrics_writer(path: Path, keep_through: int) -> MetricsLog:
    """Open metrics.jsonl for appending, first dropping records after step `keep_through` (written
    after the checkpoint a resumed run starts from, so they will be written again)."""
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
    return MetricsLog(path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(path: Path, ctx: "StepContext", progress: dict) -> None:
    """Write the training state into a fresh directory, then swap it in with renames: a crash
    leaves the previous checkpoint (or, between the two renames, `.checkpoint.old`, which
    `load_checkpoint` also accepts)."""
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"student.{k}": v.detach().contiguous().cpu() for k, v in ctx.student.state_dict().items()}
    if ctx.proj is not None:
        tensors.update({f"proj.{k}": v.detach().contiguous().cpu() for k, v in ctx.proj.state_dict().items()})
    save_file(tensors, str(tmp / "model.safetensors"))
    torch.save({"optimizer": ctx.optimizer.state_dict(), "scheduler": ctx.scheduler.state_dict(), "rng": _rng_state()},
               tmp / "training_state.pt")
    write_json(tmp / "progress.json", progress)  # written last: its presence marks a complete checkpoint
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, ctx: "StepContext", device) -> dict:
    """Restore model, projection, optimizer, scheduler and RNG from `path`; returns the progress."""
    if not (path / "progress.json").is_file():
        old = path.with_name(f".{path.name}.old")
        if not (old / "progress.json").is_file():
            raise InputError(f"--resume: {path} is not a complete checkpoint")
        path = old
    tensors = load_file(str(path / "model.safetensors"), device=str(device))
    ctx.student.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")})
    if ctx.proj is not None:
        ctx.proj.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("proj.")})
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return json.loads((path / "progress.json").read_text(encoding="utf-8"))


RUN_FILES = ("run.json", "metrics.jsonl", "results.json", "best", "checkpoint", ".checkpoint.tmp", ".checkpoint.old")


def clear_run(out: Path) -> None:
    """Remove a previous run's files from `out` (only those this command writes)."""
    if not out.is_dir():
        return
    for entry in [out / name for name in RUN_FILES] + sorted(out.glob("seed-*")):
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()


class Progress:
    """A one-line progress bar on stderr: step, loss, rate, ETA (a line per 10% when not a terminal)."""

    def __init__(self, total: int, start: int = 0, label: str = "", stream=None):
        self.total, self.start, self.label = total, start, label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = self.last = time.time()
        self.shown_decile = start * 10 // max(total, 1)

    def update(self, step: int, loss: float) -> None:
        now = time.time()
        decile = step * 10 // max(self.total, 1)
        if self.tty and (now - self.last > 0.2 or step == self.total):
            self.stream.write("\r" + self._line(step, loss, now))
        elif not self.tty and decile > self.shown_decile:
            self.stream.write(self._line(step, loss, now) + "\n")
        else:
            return
        self.last, self.shown_decile = now, decile
        self.stream.flush()

    def _line(self, step: int, loss: float, now: float) -> str:
        done = step / max(self.total, 1)
        bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        return f"{self.label} [{bar}] {step}/{self.total} loss {loss:.4f} {rate:.1f} it/s ETA {_clock(eta)}"

    def close(self, note: str = "") -> None:
        if self.tty:
            self.stream.write("\n")
        if note:
            self.stream.write(f"{self.label}: {note}\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


def _field(default, help, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run takes; `python -m xlmr_mini.train --help` mirrors it flag by flag."""

    init: str = _field("from-teacher", "how the model starts: copy the fine-tuned teacher, copy a pretrained base, or random", choices=INITS)
    teacher: str | None = _field(None, "fine-tuned teacher HF directory (the demo trains and caches its own)")
    base: str | None = _field(None, "pretrained base HF directory, e.g. xlm-roberta-base (for --init from-base)")
    data: str | None = _field(None, "dataset: massive:PATH, tsm:PATH, file:PATH, or demo (default: the built-in demo)")
    layers: int | None = _field(None, "student layers (default: half the teacher's; from-base without a teacher: the base's)")
    hidden: int | None = _field(None, "student hidden size (default: the teacher's)")
    heads: int | None = _field(None, "student attention heads (default: the teacher's)")
    intermediate: int | None = _field(None, "student MLP size (default: the teacher's, scaled like --hidden)")
    layer_map: list[int] | None = _field(None, "0-based teacher layer per student layer (default: layer i*divisor, paper eq. 5)")
    train_langs: str = _field("all", "training languages: all | seen | english | comma-separated list")
    subset: float = _field(1.0, "train on this stratified fraction of the training split (0-1]")
    epochs: int | None = _field(None, f"training epochs (default: {PAPER_EPOCHS} as the paper; the demo: {DEMO_EPOCHS})")
    max_steps: int | None = _field(None, "train exactly this many steps instead (the schedule decays over them)")
    batch_size: int = _field(32, "training batch size (transformers' Trainer default, which the paper kept, is 8)")
    eval_batch_size: int = _field(64, "evaluation batch size")
    lr: float | None = _field(None, f"peak learning rate (default: 5e-5, transformers' default; the demo: {DEMO_LR})")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    warmup_ratio: float = _field(0.0, "fraction of the steps with a linear warm-up before the decay (the paper: none)")
    max_grad_norm: float = _field(1.0, "clip the gradient norm to this (0: no clipping)")
    max_length: int = _field(128, "tokens per example including <s> and </s>")
    eval_steps: int | None = _field(None, "evaluate on dev every this many steps (default: once per epoch)")
    seeds: list[int] = _field((42,), "one run per seed; several report mean and spread")
    no_kd: bool = _field(False, "train on labels only (cross-entropy), no distillation: the paper's NON-KD")
    att_target: str = _field("scores", "attention KD target: pre-softmax scores (TinyBERT's code) or probs", choices=ATT_TARGETS)
    hid_proj: str = _field("linear", "narrower student: learnable projection (fit_dense) or the teacher's copied units", choices=HID_PROJS)
    kd_impl: str = _field("reference", "KD loss implementation: PyTorch reference or fused kernels (Triton on GPU)", choices=IMPLS)
    bf16: bool = _field(False, "bfloat16 autocast for forward passes (weights and optimizer stay fp32)")
    compile: bool = _field(False, "torch.compile the forward + loss of the training step (fullgraph)")
    device: str = _field("auto", "cpu, cuda, or auto")
    num_threads: int | None = _field(None, "CPU threads for PyTorch (default: PyTorch's choice; the demo: 1)")
    out: str | None = _field(None, "output directory (default: runs/<data>-<init>-<layers>L-<kd|nokd>)")
    resume: bool = _field(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = _field(False, "replace a different run found in --out")
    stop_after: int | None = _field(None, "checkpoint and stop once the run reaches this step (continue later with --resume)")
    cache_dir: str | None = _field(None, "cache for tokenized data, the demo and its teacher (default: ~/.cache/xlmr_mini)")

    def __post_init__(self):
        self.seeds = tuple(self.seeds)
        self.layer_map = tuple(self.layer_map) if self.layer_map is not None else None
        if not self.seeds:
            raise InputError("--seeds: give at least one seed")
        for name in ("batch_size", "eval_batch_size", "epochs", "max_steps", "eval_steps", "stop_after", "layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} {value}: must be at least 1")

    @property
    def is_demo(self) -> bool:
        return self.data in (None, "demo")

    def identity(self) -> dict:
        """The settings that define the run's result (what `run.json` compares)."""
        ignored = {"out", "resume", "overwrite", "stop_after", "num_threads", "compile", "device", "cache_dir"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m xlmr_mini.train",
        description="Train an XLM-R classifier: a teacher (--init from-base --no-kd), or a student initialized "
        "from the teacher, the base, or from scratch, with TinyBERT-style distillation (default) or without "
        "(--no-kd). With no --data it runs the built-in demo (trains its own small teacher first).",
        epilog="Example, the paper's tsm setup: train a teacher with --init from-base --base XLMR --layers 12 --no-kd "
        "--data tsm:PATH --out runs/teacher, then a student with --init from-teacher --teacher runs/teacher/best "
        "--layers 6 --data tsm:PATH --seeds 1 2 3.",
    )
    for f in dataclasses.fields(TrainConfig):
        flag, meta = "--" + f.name.replace("_", "-"), dict(f.metadata)
        if f.type == "bool" or f.type is bool:
            p.add_argument(flag, action="store_true", help=meta["help"])
            continue
        kind = {"int": int, "float": float, "str": str}
        base = next((t for name, t in kind.items() if str(f.type).startswith(name) or f.type is t), str)
        nargs = "+" if str(f.type).startswith("list") else None
        default_text = f" (default: {_show(f.default)})" if f.default is not None else ""
        p.add_argument(flag, type=int if nargs else base, nargs=nargs, default=f.default,
                       choices=meta.get("choices"), help=meta["help"] + default_text)
    return p


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_config(argv=None) -> TrainConfig:
    args = _parser().parse_args(argv)
    return TrainConfig(**vars(args))


# ---------------------------------------------------------------------------------------------
# What a run needs, resolved once for all seeds
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    task: TaskData
    tokenizer_file: Path
    teacher_dir: Path | None  # the teacher used for init and/or KD (None: no teacher)
    labels: tuple[str, ...]  # the model's label order
    splits: dict[str, EncodedSplit]  # train, dev, and final (test, else dev)
    final_name: str
    final_note: str
    arch: XLMRConfig | None = None  # sizes for from-scratch when there is no teacher or base
    epochs: int = PAPER_EPOCHS
    lr: float = 5e-5


def demo_banner() -> str:
    return ("This is the built-in demo (a synthetic 6-language task, no downloads). On real data: "
            "python -m xlmr_mini.train --data tsm:PATH --teacher TEACHER_DIR --init from-teacher (see --help).")


def prepare(cfg: TrainConfig, teacher_dir: Path | None = None, arch: XLMRConfig | None = None) -> Setup:
    """Load and check the data, tokenizer and labels; the demo's teacher is passed in `teacher_dir`."""
    _check_inputs(cfg)
    task = load_task(cfg.data or "demo", cache_dir=cfg.cache_dir)
    teacher_dir = Path(cfg.teacher) if cfg.teacher else teacher_dir
    tok = find_tokenizer(teacher_dir) if teacher_dir else None
    tok = tok or (find_tokenizer(cfg.base) if cfg.base else None) or task.tokenizer_path
    if tok is None:
        raise InputError("no tokenizer.json found beside --teacher or --base, and the data brings none")
    labels = XLMRConfig.from_hf(teacher_dir).id2label if teacher_dir else task.labels
    where = f"teacher {teacher_dir}" if teacher_dir else "model"
    remap = label_ids(task.labels, labels, where)
    final_name, note = final_split(task)
    splits = _encode(cfg, task, Tokenizer(tok), remap, final_name)
    return Setup(task=task, tokenizer_file=Path(tok), teacher_dir=teacher_dir, labels=labels, splits=splits,
                 final_name=final_name, final_note=note, arch=arch,
                 epochs=cfg.epochs or (DEMO_EPOCHS if cfg.is_demo else PAPER_EPOCHS),
                 lr=cfg.lr if cfg.lr is not None else (DEMO_LR if cfg.is_demo else 5e-5))


def _check_inputs(cfg: TrainConfig) -> None:
    if cfg.init not in INITS:
        raise InputError(f"--init {cfg.init!r}: unknown initialization; choose one of {', '.join(INITS)}")
    if not cfg.is_demo and cfg.teacher is None and (cfg.init == "from-teacher" or not cfg.no_kd):
        need = "from-teacher copies the teacher" if cfg.init == "from-teacher" else "distillation needs a teacher"
        raise InputError(f"--teacher: {need}; give the fine-tuned teacher's directory (only the demo trains its own), "
                         f"or use --no-kd with --init from-base/from-scratch")
    if cfg.init == "from-base" and cfg.base is None:
        raise InputError("--base: from-base copies a pretrained base model; give its directory (e.g. xlm-roberta-base)")
    if not 0.0 < cfg.subset <= 1.0:
        raise InputError(f"--subset {cfg.subset}: must be a fraction in (0, 1]")


def _encode(cfg: TrainConfig, task: TaskData, tok: Tokenizer, remap: np.ndarray, final_name: str) -> dict:
    if "train" not in task.splits or "dev" not in task.splits:
        raise InputError(f"{task.source}: training needs a train and a dev split (found: {', '.join(task.splits)})")
    train = select_languages(task.splits["train"], cfg.train_langs, task)
    # The subset is the data's, not the run's: every seed and init trains on the same examples.
    train = stratified_subset(train, cfg.subset, seed=0)
    parts = {"train": train, "dev": task.splits["dev"], "final": task.splits[final_name]}
    return {name: encode_split(to_model_labels(split, remap), tok, cfg.max_length, cache_dir=cfg.cache_dir)
            for name, split in parts.items()}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def student_spec(cfg: TrainConfig, setup: Setup) -> StudentSpec:
    layers = cfg.layers
    if layers is None and cfg.layer_map is None:
        if setup.teacher_dir is not None and not (cfg.init == "from-base" and cfg.no_kd):
            layers = max(1, XLMRConfig.from_hf(setup.teacher_dir).num_hidden_layers // 2)
    return StudentSpec(layers=layers, hidden=cfg.hidden, heads=cfg.heads, intermediate=cfg.intermediate,
                       layer_map=cfg.layer_map, id2label=setup.labels)


def initial_student(cfg: TrainConfig, setup: Setup, seed: int) -> tuple[XLMRConfig, dict]:
    """(config, HF state dict) of the untrained student, as `--init` says."""
    spec = student_spec(cfg, setup)
    if cfg.init == "from-scratch" and setup.teacher_dir is None and cfg.base is None:
        if setup.arch is None:
            raise InputError("--init from-scratch: give --teacher or --base to take the sizes from")
        scfg = student_config(setup.arch, spec)
        return scfg, scratch_state_dict(scfg, seed)
    return init_student(cfg.init, spec, teacher=setup.teacher_dir, base=cfg.base, seed=seed)


def load_teacher(setup: Setup, student_cfg: XLMRConfig, device) -> XLMRClassifier:
    teacher = load_model(setup.teacher_dir, device=device).eval().requires_grad_(False)
    if teacher.cfg.id2label != student_cfg.id2label:
        raise InputError(f"teacher {setup.teacher_dir}: labels {teacher.cfg.id2label} disagree with the student's "
                         f"{student_cfg.id2label}")
    if teacher.cfg.num_attention_heads != student_cfg.num_attention_heads:
        raise InputError(f"attention distillation compares heads one to one: the student has "
                         f"{student_cfg.num_attention_heads} heads, the teacher {teacher.cfg.num_attention_heads}; "
                         f"keep --heads at the teacher's or use --no-kd")
    if teacher.cfg.vocab_size != student_cfg.vocab_size:
        raise InputError(f"teacher {setup.teacher_dir}: vocabulary {teacher.cfg.vocab_size} differs from the "
                         f"student's {student_cfg.vocab_size}; both must share one tokenizer")
    return teacher


# ---------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepContext:
    """What `train_step` needs besides the batch; `loss_fn` is `forward_loss` or its compiled form."""

    student: XLMRClassifier
    teacher: XLMRClassifier | None
    proj: HiddenProjection | None
    loss_cfg: KDLossConfig
    layer_map: list[int]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    max_grad_norm: float = 1.0
    bf16: bool = False
    loss_fn: object = None


def forward_loss(student, proj, input_ids, mask, labels, teacher_out, loss_cfg: KDLossConfig,
                 lmap: list[int], bf16: bool = False):
    """Student forward + `kd_loss`: what `--compile` compiles (fullgraph); backward runs outside."""
    taps = kd_taps(loss_cfg, range(student.cfg.num_hidden_layers))
    # The loss runs under autocast too (fit_dense on bf16 states); its terms upcast to fp32.
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = student(input_ids, mask, taps)
        return kd_loss(out, teacher_out, labels, mask, loss_cfg, proj, lmap)


def compile_forward_loss(backend: str = "inductor"):
    """`forward_loss` compiled whole (fullgraph=True). The teacher's outputs are inference tensors;
    a compiled graph may save its inputs for backward, which autograd forbids for those, so they
    are first copied into normal tensors (only the tapped layers: a small, short-lived copy)."""
    compiled = torch.compile(forward_loss, fullgraph=True, backend=backend)

    def loss_fn(student, proj, input_ids, mask, labels, teacher_out, *args):
        return compiled(student, proj, input_ids, mask, labels, _normal_tensors(teacher_out), *args)

    return loss_fn


def _normal_tensors(out):
    if out is None:
        return None
    copy = lambda xs: [x.clone() for x in xs]  # noqa: E731 (clone outside inference mode = normal tensor)
    return dataclasses.replace(out, logits=out.logits.clone(), hidden=copy(out.hidden), scores=copy(out.scores),
                               probs=copy(out.probs), q=copy(out.q), k=copy(out.k),
                               embeddings=None if out.embeddings is None else out.embeddings.clone())


def teacher_forward(ctx: StepContext, input_ids, mask):
    if ctx.teacher is None or not ctx.loss_cfg.kd:
        return None
    with torch.inference_mode(), torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
        return ctx.teacher(input_ids, mask, kd_taps(ctx.loss_cfg, ctx.layer_map))


def train_step(ctx: StepContext, batch: dict, device) -> dict[str, float]:
    """One optimizer step; returns the loss and its terms. A non-finite loss raises before the
    weights change, so the last checkpoint stays the last good state."""
    input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    teacher_out = teacher_forward(ctx, input_ids, mask)
    loss_fn = ctx.loss_fn or forward_loss
    total, terms = loss_fn(ctx.student, ctx.proj, input_ids, mask, labels, teacher_out, ctx.loss_cfg,
                           ctx.layer_map, ctx.bf16)
    values = {"loss": total.item(), **{k: v.item() for k, v in terms.items()}}
    if not math.isfinite(values["loss"]):
        ctx.optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"the loss became {values['loss']} ({', '.join(f'{k}={v:.4g}' for k, v in terms.items())})")
    total.backward()
    if ctx.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(ctx.params, ctx.max_grad_norm)
    ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return values


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with transformers' defaults; the fused implementation where PyTorch has one."""
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def linear_schedule(optimizer, total_steps: int, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' `get_linear_schedule_with_warmup`: up from 0 over `warmup_steps`, then
    linearly down to 0 at `total_steps` (the paper: no warm-up)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_context(cfg: TrainConfig, setup: Setup, seed: int, device, total_steps: int) -> StepContext:
    torch.manual_seed(seed)
    scfg, sd = initial_student(cfg, setup, seed)
    if cfg.max_length + scfg.pad_token_id + 1 > scfg.max_position_embeddings:
        raise InputError(f"--max-length {cfg.max_length}: the model has positions for at most "
                         f"{scfg.max_position_embeddings - scfg.pad_token_id - 1} tokens")
    student = build_model(scfg, sd, device=device, dtype=torch.float32).train()
    loss_cfg = KDLossConfig(kd=not cfg.no_kd, att_target=cfg.att_target, hid_proj=cfg.hid_proj, impl=cfg.kd_impl)
    teacher, proj, lmap = None, None, []
    if loss_cfg.kd:
        teacher = load_teacher(setup, scfg, device)
        lmap = layer_map(teacher.cfg.num_hidden_layers, scfg.num_hidden_layers, cfg.layer_map)
        proj = HiddenProjection(scfg.hidden_size, teacher.cfg.hidden_size, cfg.hid_proj).to(device)
    params = list(student.parameters()) + (list(proj.parameters()) if proj is not None else [])
    optimizer = make_optimizer(params, setup.lr, cfg.weight_decay)
    ctx = StepContext(student=student, teacher=teacher, proj=proj, loss_cfg=loss_cfg, layer_map=lmap,
                      optimizer=optimizer, params=params,
                      scheduler=linear_schedule(optimizer, total_steps, math.ceil(cfg.warmup_ratio * total_steps)),
                      max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16)
    if cfg.compile:
        ctx.loss_fn = compile_forward_loss()
    return ctx


# ---------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Progression:
    """Where a run is; saved in the checkpoint."""

    step: int = 0
    best_f1: float = -1.0
    best_step: int = 0
    last_eval_step: int = 0


def run_seed(cfg: TrainConfig, setup: Setup, seed: int, out: Path, device) -> dict:
    """Train one seed into `out`; returns its results (also written to results.json)."""
    started = time.time()
    train_enc = setup.splits["train"]
    pad_id = Tokenizer(setup.tokenizer_file).pad_id
    steps_per_epoch = len(epoch_batches(train_enc, cfg.batch_size, seed=seed, epoch=0, pad_id=pad_id))
    total = cfg.max_steps or setup.epochs * steps_per_epoch
    eval_every = cfg.eval_steps or steps_per_epoch
    ctx = build_context(cfg, setup, seed, device, total)
    prog = Progression()
    if cfg.resume and (out / "checkpoint").exists():
        prog = Progression(**load_checkpoint(out / "checkpoint", ctx, device))
    log = metrics_writer(out / "metrics.jsonl", keep_through=prog.step)
    bar = Progress(total, start=prog.step, label=f"seed {seed}")
    limit = min(total, cfg.stop_after or total)
    try:
        while prog.step < limit:
            epoch, k = divmod(prog.step, steps_per_epoch)
            batches = epoch_batches(train_enc, cfg.batch_size, seed=seed, epoch=epoch, pad_id=pad_id)
            for batch in batches[k:]:
                _one_step(cfg, setup, ctx, prog, batch, out, log, bar, eval_every, total, epoch, device)
                if prog.step >= limit:
                    break
        if prog.step < total:
            save_checkpoint(out / "checkpoint", ctx, dataclasses.asdict(prog))
            bar.close(f"stopped at step {prog.step} of {total} (--stop-after); continue with --resume")
            return {"stopped_at": prog.step}
    except TrainingError as e:
        bar.close("diverged")
        kept = out / "checkpoint"
        ckpt = f"the last good checkpoint is kept in {kept}" if kept.exists() else "no checkpoint was written yet"
        raise TrainingError(f"seed {seed}, step {prog.step + 1}: {e}; {ckpt}. "
                            f"Try a lower --lr or without --bf16.") from None
    finally:
        log.close()
    bar.close()
    return _finish(cfg, setup, seed, out, device, prog, time.time() - started)


def _one_step(cfg, setup, ctx, prog, batch, out, log, bar, eval_every, total, epoch, device) -> None:
    values = train_step(ctx, batch, device)
    prog.step += 1
    lr = ctx.scheduler.get_last_lr()[0]
    log.write({"type": "train", "step": prog.step, "epoch": epoch, "lr": lr, **values})
    bar.update(prog.step, values["loss"])
    if prog.step % eval_every == 0 or prog.step == total:
        _evaluate_dev(cfg, setup, ctx, prog, out, log, device)
        save_checkpoint(out / "checkpoint", ctx, dataclasses.asdict(prog))


def _evaluate_dev(cfg, setup, ctx, prog, out, log, device) -> None:
    scores = evaluate(ctx.student, setup.splits["dev"], cfg.eval_batch_size, setup.task.unseen, cfg.bf16)
    f1 = scores["overall"]["macro_f1"]
    improved = f1 > prog.best_f1
    if improved:
        prog.best_f1, prog.best_step = f1, prog.step
        save_model(out / "best", ctx.student, setup.tokenizer_file)
    prog.last_eval_step = prog.step
    log.write({"type": "eval", "split": "dev", "step": prog.step, "best": improved, **scores})


def _finish(cfg, setup, seed, out, device, prog, wall_s) -> dict:
    best = load_model(out / "best", device=device)
    final = evaluate(best, setup.splits["final"], cfg.eval_batch_size, setup.task.unseen, cfg.bf16)
    results = {
        "seed": seed, "best_step": prog.best_step, "steps": prog.step, "dev_macro_f1": prog.best_f1,
        "final_split": setup.final_name, "note": setup.final_note, "final": final,
        "student": {"layers": best.cfg.num_hidden_layers, "hidden": best.cfg.hidden_size,
                    "heads": best.cfg.num_attention_heads,
                    "parameters": sum(p.numel() for p in best.parameters())},
        "teacher": str(setup.teacher_dir) if setup.teacher_dir else None,
        "wall_s": round(wall_s, 1), "config": dataclasses.asdict(cfg),
    }
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"type": "eval", "split": setup.final_name, "final": True, "step": prog.best_step, **final}) + "\n")
    write_json(out / "results.json", results)
    return results


# ---------------------------------------------------------------------------------------------
# Output directory, seeds, the demo teacher
# ---------------------------------------------------------------------------------------------
def default_out(cfg: TrainConfig) -> Path:
    data = "demo" if cfg.is_demo else cfg.data.split(":", 1)[0]
    layers = f"-{cfg.layers}L" if cfg.layers else ""
    return Path("runs") / f"{data}-{cfg.init}{layers}-{'nokd' if cfg.no_kd else 'kd'}"


def claim_out(cfg: TrainConfig, out: Path) -> None:
    """Check that `out` is free for this run (or holds it, with --resume); write run.json."""
    run_file = out / "run.json"
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    if cfg.overwrite:
        clear_run(out)
    elif run_file.is_file():
        _check_same_run(cfg, out, json.loads(run_file.read_text(encoding="utf-8")))
    elif out.is_dir() and any((out / name).exists() for name in ("checkpoint", "best", "metrics.jsonl", "results.json")):
        raise InputError(f"--out {out}: holds training output without run.json; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_file, {"identity": cfg.identity()})


def _check_same_run(cfg: TrainConfig, out: Path, previous: dict) -> None:
    old, new = previous.get("identity", {}), json.loads(json.dumps(cfg.identity()))
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff[:3])
        raise InputError(f"--out {out}: holds a different run ({shown}); choose another --out or pass --overwrite")
    unfinished = not (out / "results.json").exists() and any(out.glob("**/checkpoint"))
    if unfinished and not cfg.resume:
        raise InputError(f"--out {out}: holds an unfinished run of these settings; pass --resume to continue it "
                         f"or --overwrite to start over")
    if not cfg.resume:
        clear_run(out)


def seed_dirs(cfg: TrainConfig, out: Path) -> list[tuple[int, Path]]:
    return [(s, out if len(cfg.seeds) == 1 else out / f"seed-{s}") for s in cfg.seeds]


def demo_teacher(cfg: TrainConfig, device) -> Path:
    """The demo's teacher: trained from scratch on the demo once, then cached (by demo version and seed)."""
    cache = Path(cfg.cache_dir or default_cache_dir()) / "demo" / f"v{DEMO_VERSION}"
    seed = cfg.seeds[0]
    key = hashlib.sha256(json.dumps(DEMO_TEACHER, sort_keys=True).encode()).hexdigest()[:8]
    final = cache / f"teacher-seed{seed}-{key}"
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        print(f"demo teacher: using the cached one in {final}")
        return final
    t = DEMO_TEACHER
    print(f"demo teacher: training a {t['layers']}-layer, {t['hidden']}-wide classifier from scratch on the demo "
          f"({t['epochs']} epochs; cached for next time)")
    tcfg = TrainConfig(init="from-scratch", data="demo", layers=t["layers"], hidden=t["hidden"], heads=t["heads"],
                       intermediate=t["intermediate"], epochs=t["epochs"], lr=t["lr"], warmup_ratio=t["warmup_ratio"],
                       no_kd=True, seeds=(seed,),
                       batch_size=cfg.batch_size, max_length=cfg.max_length, device=cfg.device,
                       cache_dir=cfg.cache_dir, out=str(final.with_name(final.name + ".work")), overwrite=True,
                       bf16=cfg.bf16)
    task = load_task("demo", cache_dir=cfg.cache_dir)
    arch = demo_architecture(task)
    results = train(tcfg, arch=arch, quiet=True)
    print(f"demo teacher: dev macro-F1 {100 * results['dev_macro_f1']:.2f}%")
    work = Path(tcfg.out)
    tmp = final.with_name("." + final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "best", tmp)
    os.replace(tmp, final)
    shutil.rmtree(work, ignore_errors=True)
    return final


def demo_architecture(task: TaskData) -> XLMRConfig:
    """XLM-R sized for the demo's teacher: its vocabulary, short positions."""
    t = DEMO_TEACHER
    vocab = Tokenizer(task.tokenizer_path).vocab_size
    return XLMRConfig(vocab_size=vocab, hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                      num_attention_heads=t["heads"], intermediate_size=t["intermediate"],
                      max_position_embeddings=130, id2label=task.labels)


def train(cfg: TrainConfig, arch: XLMRConfig | None = None, quiet: bool = False) -> dict:
    """Run every seed of `cfg`; returns the results (one seed's, or the summary of several)."""
    threads = torch.get_num_threads()
    if cfg.num_threads or cfg.is_demo:
        torch.set_num_threads(cfg.num_threads or DEMO_THREADS)
    try:
        return _train(cfg, arch, quiet)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, arch: XLMRConfig | None, quiet: bool) -> dict:
    device = resolve_device(cfg.device)
    teacher = None
    if cfg.is_demo and cfg.teacher is None and arch is None:
        if not quiet:
            print(demo_banner())
        _check_inputs(cfg)
        teacher = demo_teacher(cfg, device)
    setup = prepare(cfg, teacher_dir=teacher, arch=arch)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    claim_out(cfg, out)
    runs = []
    for seed, run_dir in seed_dirs(cfg, out):
        done = run_dir / "results.json"
        if cfg.resume and done.is_file():
            runs.append(json.loads(done.read_text(encoding="utf-8")))
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.append(run_seed(cfg, setup, seed, run_dir, device))
        if "stopped_at" in runs[-1]:
            return runs[-1]
    return _report(cfg, setup, out, runs, quiet)


def _report(cfg, setup, out, runs, quiet) -> dict:
    result = runs[0] if len(runs) == 1 else _summarize(cfg, out, runs)
    if quiet:
        return result
    title = (f"{setup.final_name} split, best-on-dev model: macro-F1 and accuracy per language"
             + (f" (seed {runs[0]['seed']})" if len(runs) == 1 else f" (mean of {len(runs)} seeds)"))
    print(format_table(result["final"], setup.task.unseen, title))
    if setup.final_note:
        print(setup.final_note)
    print(_summary_line(cfg, setup, out, runs, result))
    return result


def _summarize(cfg, out, runs) -> dict:
    """Mean over seeds of every score, spread of the overall ones; written to out/results.json."""
    final = _mean_scores([r["final"] for r in runs])
    summary = {
        "seeds": [r["seed"] for r in runs], "final_split": runs[0]["final_split"], "note": runs[0]["note"],
        "dev_macro_f1": summarize_seeds([r["dev_macro_f1"] for r in runs]),
        "final_macro_f1": summarize_seeds([r["final"]["overall"]["macro_f1"] for r in runs]),
        "final_accuracy": summarize_seeds([r["final"]["overall"]["accuracy"] for r in runs]),
        "final": final, "runs": [f"seed-{r['seed']}" for r in runs], "config": dataclasses.asdict(cfg),
    }
    write_json(out / "results.json", summary)
    return summary


def _mean_scores(all_scores: list[dict]) -> dict:
    def mean_row(rows):
        return {"macro_f1": float(np.mean([r["macro_f1"] for r in rows])),
                "accuracy": float(np.mean([r["accuracy"] for r in rows])), "n": rows[0]["n"]}

    first = all_scores[0]
    mean = {"overall": mean_row([s["overall"] for s in all_scores]),
            "languages": {lang: mean_row([s["languages"][lang] for s in all_scores]) for lang in first["languages"]}}
    for part in ("seen", "unseen"):
        if part in first:
            mean[part] = mean_row([s[part] for s in all_scores])
    return mean


def _summary_line(cfg, setup, out, runs, result) -> str:
    name = setup.final_name
    if len(runs) == 1:
        r = result
        f1, acc = r["final"]["overall"]["macro_f1"], r["final"]["overall"]["accuracy"]
        return (f"{cfg.init}{'' if cfg.no_kd else ' + KD'}, {r['student']['layers']} layers x {r['student']['hidden']}: "
                f"best dev macro-F1 {100 * r['dev_macro_f1']:.2f}% at step {r['best_step']}/{r['steps']}; "
                f"{name} macro-F1 {100 * f1:.2f}%, accuracy {100 * acc:.2f}%; {r['wall_s']:.0f}s; wrote {out}")
    s = result
    return (f"{cfg.init}{'' if cfg.no_kd else ' + KD'}, {len(runs)} seeds: {name} macro-F1 "
            f"{100 * s['final_macro_f1']['mean']:.2f}% +- {100 * s['final_macro_f1']['std']:.2f}, dev macro-F1 "
            f"{100 * s['dev_macro_f1']['mean']:.2f}% +- {100 * s['dev_macro_f1']['std']:.2f}; wrote {out}")


@cli_main
def main(argv=None) -> dict:
    cfg = parse_config(argv)
    try:
        return train(cfg)
    except TrainingError as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
