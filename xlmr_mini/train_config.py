"""The run configuration: `TrainConfig`, one field per `python -m xlmr_mini.train` flag, and the
argparse parser derived from its fields (help text and choices live beside each field).

The defaults follow the paper's §3.1 (AdamW with transformers' defaults: lr 5e-5, betas
0.9/0.999, eps 1e-8, no weight decay, gradient norm clipped at 1.0 as the transformers Trainer
does; linear decay to 0 with no warm-up; 30 epochs), except where a field's help says otherwise.
"""
import argparse
import dataclasses
import math

from xlmr_mini.config import check_max_length
from xlmr_mini.copy_weights import INITS
from xlmr_mini.errors import InputError, IntList, OneLineErrorParser, deprecated_alias
from xlmr_mini.hardware import PRECISIONS
from xlmr_mini.kd_loss import ATT_TARGETS, HID_PROJS, LOSS_NORMS
from xlmr_mini.metrics import METRICS
from xlmr_mini.step_impl import COMPILES, KD_IMPLS

PAPER_EPOCHS = 30
PAPER_LR = 5e-5  # transformers' default, which the paper kept
DEMO_EPOCHS = 8
DEMO_LR = 1e-3
# The demo's models are tiny: one thread beats two (thread sync costs more than the matmuls, ~10x
# slower on a busy 2-core machine).
DEMO_THREADS = 1
DEFAULT_BATCH_SIZE = 32
DEFAULT_SEEDS = (42,)
SELECT_ON = ("train-langs", "all")
AT_LEAST_1 = ("batch_size", "eval_batch_size", "epochs", "max_steps", "eval_steps", "stop_after", "layers", "hidden",
              "heads", "intermediate", "num_threads", "dist_timeout", "grad_accum", "save_steps", "logging_steps")
# --preset paper-3.2|3.3|3.4 applies the settings of that section of the paper; plain `paper`
# takes the section from --langs (all: 3.2, seen: 3.3, english: 3.4). Table 3's
# English-trained students belong to 3.3: give them --preset paper-3.3.
SECTIONS = ("3.2", "3.3", "3.4")
SECTION_OF_LANGS = {"all": "3.2", "seen": "3.3", "english": "3.4"}
PRESETS = ("paper",) + tuple(f"paper-{s}" for s in SECTIONS)
SAVE_VOCABS = ("full", "task")
TEACHER_CACHE_MODES = ("auto", "on", "off")
REPORT_TO = ("none", "tensorboard")
# §3.1: evaluation every 5000 steps on massive for §3.2-3.3 and 100 for §3.4 (English only);
# on tsm 500, 250 and 60 for §3.2 (all languages), §3.3 (seen languages) and §3.4.
PAPER_EVAL_STEPS = {("massive", "3.2"): 5000, ("massive", "3.3"): 5000, ("massive", "3.4"): 100,
                    ("tsm", "3.2"): 500, ("tsm", "3.3"): 250, ("tsm", "3.4"): 60}
# Fields whose default depends on --preset: (without a preset, with the paper's).
# logging_steps: transformers' default of 500 (one record per step would be ~1 GB on massive).
PRESET_DEFAULTS = {"precision": ("auto", "fp32"), "group_by_length": (True, False), "eval_last_step": (True, False),
                   "logging_steps": (1, 500)}


def paper_settings(data: str | None, section: str | None) -> dict:
    """The paper's settings where our defaults differ, for one section of it (§3.1): batch 8,
    30 epochs, seeds 1 2 3, fp32, plain random batches (transformers' Trainer defaults), and its
    evaluation steps for the dataset and section, only every that many steps."""
    values = {"batch_size": 8, "epochs": PAPER_EPOCHS, "seeds": (1, 2, 3),
              **{name: paper for name, (_, paper) in PRESET_DEFAULTS.items()}}
    kind = (data or "demo").split(":", 1)[0]
    if (kind, section) in PAPER_EVAL_STEPS:
        values["eval_steps"] = PAPER_EVAL_STEPS[kind, section]
    return values


def check_seeds(seeds: tuple[int, ...]) -> None:
    if not seeds:
        raise InputError("--seed: give at least one seed")
    repeated = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if repeated is not None:
        raise InputError(f"--seed {' '.join(map(str, seeds))}: seed {repeated} is given twice (each seed is one run)")


def preset_section(preset: str, train_langs: str) -> str | None:
    """The paper's section a preset stands for (None: no section, e.g. a language list)."""
    return preset.split("-", 1)[1] if "-" in preset else SECTION_OF_LANGS.get(train_langs)


def _field(default, help, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run takes; `python -m xlmr_mini.train --help` mirrors it flag by flag."""

    init: str = _field("from-teacher", "how the model starts: copy the fine-tuned teacher, copy a pretrained base, or random", choices=INITS)
    teacher: str | None = _field(None, "fine-tuned teacher HF directory (the demo trains and caches its own)")
    base: str | None = _field(None, "pretrained base HF directory, e.g. xlm-roberta-base (for --init from-base)")
    data: str | None = _field(None, "dataset: massive:PATH, tsm:PATH, file:PATH, or demo (default: the built-in demo)")
    layers: int | None = _field(None, "student layers (default: half the teacher's whenever there is a teacher; "
                                "from-base without one: the base's, the teacher recipe)")
    hidden: int | None = _field(None, "student hidden size (default: the teacher's)")
    heads: int | None = _field(None, "student attention heads (default: the teacher's)")
    intermediate: int | None = _field(None, "student MLP size (default: the teacher's, scaled like --hidden)")
    layer_map: list[int] | None = _field(None, "0-based teacher layer per student layer, space-separated, e.g. 0 2 4 "
                                         "(default: layer i*divisor, paper eq. 5)")
    train_langs: str = _field("all", "training languages: all | seen | english | comma-separated list", flag="--langs",
                              aliases=("--train-langs",))
    subset: float = _field(1.0, "train on this stratified fraction of the training split (0-1]",
                           aliases=("--fraction",))
    epochs: int | None = _field(None, f"training epochs (default: {PAPER_EPOCHS} as the paper; the demo: {DEMO_EPOCHS})")
    max_steps: int | None = _field(None, "train exactly this many steps instead (the schedule decays over them)")
    batch_size: int | None = _field(None, f"training batch size (default: {DEFAULT_BATCH_SIZE}, faster on a GPU; the paper "
                                    f"kept transformers' default 8, see --preset paper); under torchrun the global "
                                    f"batch, split across the processes")
    grad_accum: int = _field(1, "gradient accumulation: run each batch as this many smaller forward/backward passes "
                             "(for a small GPU); the optimizer step and the batch stay --batch-size's")
    recompute: bool = _field(False, "activation checkpointing: keep only each student layer's input for the backward "
                             "pass and run the layer's forward again there (the same run; slower, for a fraction of "
                             "the activation memory: bench/RESULTS.md)")
    eval_batch_size: int = _field(64, "evaluation batch size")
    lr: float | None = _field(None, f"peak learning rate (default: {PAPER_LR}, transformers' default; the demo: {DEMO_LR})")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    warmup_ratio: float = _field(0.0, "fraction of the steps with a linear warm-up before the decay (the paper: none)")
    max_grad_norm: float = _field(1.0, "clip the gradient norm to this (0: no clipping)")
    max_length: int = _field(128, "tokens per example including <s> and </s>")
    eval_steps: int | None = _field(None, "evaluate on dev every this many steps (default: once per epoch; --preset "
                                    "paper: the paper's §3.1 steps for the dataset and section)")
    eval_last_step: bool | None = _field(None, "also evaluate at the last step when it is not a multiple of --eval-steps "
                                         "(default: yes; --preset paper: no, as the paper's transformers Trainer; a "
                                         "run that never reached --eval-steps is still evaluated at its end)")
    save_steps: int | None = _field(None, "write the checkpoint (for --resume) every this many steps (default: at "
                                    "each evaluation)")
    keep_checkpoint: bool = _field(False, "keep checkpoint/ (optimizer state, about twice the model) after the run "
                                   "finishes; by default a finished run removes it")
    logging_steps: int | None = _field(None, "write one training record to metrics.jsonl every this many steps: the "
                                       "mean of their loss terms (a record is ~440 bytes; one per step adds up to "
                                       "~1 GB on massive at the paper's settings) (default: 1; --preset paper: 500, "
                                       "transformers' default)")
    report_to: str = _field("none", "also log to TensorBoard, in <out>/tensorboard (pip install -e \".[tensorboard]\")",
                            choices=REPORT_TO)
    seeds: list[int] | None = _field(None, "one run per seed, e.g. --seed 1 2 3; several report mean and spread and "
                                     "copy the best seed's model on dev to <out>/best (default: 42; the paper: 1 2 3)",
                                     flag="--seed", aliases=("--seeds",))
    metric: str = _field("micro-f1", "dev metric that picks the best checkpoint (the paper's F1 is micro-F1)", choices=METRICS)
    select_on: str = _field("train-langs", "dev languages that pick the best checkpoint: the training languages only "
                            "(zero-shot runs never see held-out labels) or all", choices=SELECT_ON)
    no_kd: bool = _field(False, "train on labels only (cross-entropy), no distillation: the paper's NON-KD")
    att_target: str = _field("probs", "attention KD target: softmax probabilities (the paper's eq. 1 on transformers' "
                             "attention outputs) or pre-softmax scores (TinyBERT's code)", choices=ATT_TARGETS)
    loss_norm: str = _field("masked", "KD loss normalisation: masked means over real tokens, mean over layers; or "
                            "TinyBERT's code (means at padded length, pads included, summed over layers)",
                            choices=LOSS_NORMS)
    hid_proj: str = _field("linear", "narrower student: learnable projection (fit_dense) or the teacher's copied units", choices=HID_PROJS)
    kd_impl: str = _field("auto", "KD loss implementation: PyTorch reference, fused Triton kernels (on CPU they fall "
                          "back to the reference), or auto: fused on CUDA where they apply, checked against the "
                          "reference on the first batch (falls back on a mismatch), the reference elsewhere",
                          choices=KD_IMPLS)
    precision: str | None = _field(None, "forward passes in fp32 or under bfloat16 autocast (the KD loss terms, weights "
                                   "and optimizer stay fp32); auto: bf16 on GPUs with bf16 and on CPUs where a cached "
                                   "probe measures bf16 matmuls faster, fp32 elsewhere and for models narrower than 256 "
                                   "(default: auto; --preset paper: fp32, the paper's transformers default; --bf16 is "
                                   "short for --precision bf16). The run records the precision auto resolved to, so "
                                   "runs on other hardware are other runs", choices=PRECISIONS)
    group_by_length: bool | None = _field(None, "draw training batches from pools of 50 batches sorted by length (fewer "
                                          "padded tokens: 1.6x on tweets) or plain random batches as the paper's "
                                          "transformers Trainer (default: grouped; --preset paper: plain random)")
    dropout: float | None = _field(None, "dropout of the hidden states and the classifier head (default: the "
                                   "initializing model's config, 0.1 for XLM-R); saved in best/config.json. Under "
                                   "torchrun each process draws the masks of its own rows: a run on 1, 2 or 8 "
                                   "processes is the same run up to float rounding only with --dropout 0 "
                                   "--attention-dropout 0")
    attention_dropout: float | None = _field(None, "dropout of the attention probabilities (default: the initializing "
                                             "model's config, 0.1 for XLM-R); saved in best/config.json")
    no_trim: bool = _field(False, "train the whole word-embedding table instead of only the rows of tokens in the data "
                           "(the same run, slower and bigger; for checking that trimming is exact)")
    save_vocab: str = _field("full", "vocabulary of the saved model: full (a drop-in model with the teacher's tokenizer; "
                             "rows of tokens never seen in training as they started) or task (only the data's tokens, "
                             "with a trimmed tokenizer.json; Unigram tokenizers such as XLM-R's)", choices=SAVE_VOCABS)
    teacher_cache: str = _field("auto", "keep the teacher's outputs on disk after the first pass and read them instead of "
                                "running the teacher: auto (when the run reads the training data more than once, "
                                "or has several seeds, and the cache takes at most half the free disk; otherwise "
                                "it says why not), on, or off", choices=TEACHER_CACHE_MODES)
    teacher_cache_dir: str | None = _field(None, "directory of the teacher caches (default: CACHE_DIR/teacher)")
    compile: str = _field("auto", "torch.compile the forward + loss of the training step (fullgraph): on, off, or "
                          "auto: on CUDA, checked against eager on the first batch (falls back on a mismatch), off on "
                          "CPU (--compile alone: on)", choices=COMPILES, const="on")
    device: str = _field("auto", "cpu, cuda, or auto")
    deterministic: bool = _field(False, "PyTorch's deterministic algorithms and cuBLAS's fixed workspace "
                                 "(CUBLAS_WORKSPACE_CONFIG), so a GPU run repeats bit for bit, a little slower (CPU "
                                 "runs repeat without it); an operation with no deterministic GPU version stops the "
                                 "run with PyTorch's error naming it")
    num_threads: int | None = _field(None, "CPU threads for PyTorch (default: PyTorch's choice; the demo: 1)")
    out: str | None = _field(None, "run directory: run.json, metrics.jsonl, results.json, best/ (the best model on "
                             "dev, an HF directory), checkpoint/ (kept with --keep-checkpoint), tensorboard/; with "
                             "several seeds a seed-N/ of these per seed, the summary results.json and the best "
                             "seed's best/ (default: runs/<data>-<init>[-<layers>L]-<kd|nokd>)")
    resume: bool = _field(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = _field(False, "train anew in place of the run in --out (a finished one too); the old run is "
                             "replaced only once the new one is complete (or stopped by --stop-after)")
    stop_after: int | None = _field(None, "checkpoint and stop once the run reaches this step (continue later with --resume)")
    dist_timeout: float = _field(600.0, "under torchrun: seconds a process waits for the others (a collective, or "
                                 "rank 0 writing a checkpoint) before it stops the job")
    cache_dir: str | None = _field(None, "cache for tokenized data, the demo and its teacher (default: ~/.cache/xlmr_mini)")
    preset: str | None = _field(None, "the paper's settings where our defaults differ (batch 8, 30 epochs, seeds 1 2 3, "
                                "fp32, plain random batches, its evaluation steps and no evaluation at a last step "
                                "off that grid); paper-3.2, paper-3.3 and paper-3.4 take the evaluation steps of that "
                                "section, paper those of the section of --langs (all: 3.2, seen: 3.3, "
                                "english: 3.4). Table 3's English-trained students are §3.3: use paper-3.3. Flags "
                                "given explicitly still win", choices=PRESETS)

    def __post_init__(self):
        # A preset fills only what was left unset (None), so explicit flags win and applying
        # it again (dataclasses.replace) changes nothing.
        if self.preset is not None:
            for name, value in paper_settings(self.data, preset_section(self.preset, self.train_langs)).items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        for name, (default, _) in PRESET_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        self.batch_size = self.batch_size if self.batch_size is not None else DEFAULT_BATCH_SIZE
        self.seeds = tuple(self.seeds if self.seeds is not None else DEFAULT_SEEDS)
        self.layer_map = tuple(self.layer_map) if self.layer_map is not None else None
        self._check_ranges()

    def _check_ranges(self) -> None:
        check_seeds(self.seeds)
        for name in AT_LEAST_1:
            value = getattr(self, name)
            if value is not None and not value >= 1:
                raise InputError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        check_max_length(self.max_length)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr {self.lr}: must be a positive number")
        for name in ("weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a number >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise InputError(f"--warmup-ratio {self.warmup_ratio}: must be a fraction in [0, 1) of the steps")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise InputError(f"--{name.replace('_', '-')} {value}: must be a probability in [0, 1)")
        if self.grad_accum > self.batch_size:
            raise InputError(f"--grad-accum {self.grad_accum}: more passes than the {self.batch_size} examples of a "
                             f"batch (--batch-size)")

    @property
    def is_demo(self) -> bool:
        return self.data in (None, "demo")

    def identity(self) -> dict:
        """The settings that define the run's result (what `run.json` compares)."""
        # grad_accum changes the sums' order only (the same run within float rounding).
        ignored = {"out", "resume", "overwrite", "stop_after", "num_threads", "compile", "kd_impl", "device", "cache_dir", "preset",
                   "dist_timeout", "grad_accum", "save_steps", "keep_checkpoint", "logging_steps", "report_to",
                   "deterministic", "teacher_cache", "teacher_cache_dir", "recompute"}
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
        "--layers 6 --data tsm:PATH --preset paper.",
    )
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if f.type == "bool" or f.type is bool:
            p.add_argument(flag, action="store_true", help=meta["help"])
            continue
        if str(f.type).startswith("bool"):  # bool | None: --x / --no-x, None until the preset or default decides
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
            continue
        kind = {"int": int, "float": float, "str": str}
        base = next((t for name, t in kind.items() if str(f.type).startswith(name) or f.type is t), str)
        listed = dict(nargs="+", action=IntList) if str(f.type).startswith("list") else dict(type=base)
        if "const" in meta:  # a flag that may stand alone: --compile means --compile on
            listed.update(nargs="?", const=meta["const"])
        default_text = f" (default: {_show(f.default)})" if f.default is not None else ""
        p.add_argument(flag, dest=f.name, default=f.default, choices=meta.get("choices"),
                       help=meta["help"] + default_text, **listed)
        for old in meta.get("aliases", ()):
            deprecated_alias(p, old, flag, dest=f.name, **listed)
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")
    return p


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_config(argv=None) -> TrainConfig:
    args = _parser().parse_args(argv)
    return TrainConfig(**vars(args))
