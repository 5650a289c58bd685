"""What a run needs, resolved once for all seeds (`prepare`), and a seed's models and step
context (`build_context`): data, tokenizer and labels; the student as `--init` says (paper §2.2,
`copy_weights.init_student`); the frozen teacher for KD; optimizer and schedule.
"""
import dataclasses
import functools
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch

from xlmr_mini import distributed, teacher_cache
from xlmr_mini.checkpoint import build_model, check_model_dir, check_tokenizer, find_tokenizer, read_hf_state_dict
from xlmr_mini.config import XLMRConfig, check_max_length
from xlmr_mini.copy_weights import INITS, StudentSpec, init_student, layer_map, scratch_state_dict, student_config
from xlmr_mini.data import (
    EncodedSplit, TaskData, default_cache_dir, encode_split, load_task, select_languages, stratified_subset,
)
from xlmr_mini.errors import InputError
from xlmr_mini.files import check_output_dir
from xlmr_mini.hardware import resolve_precision
from xlmr_mini.inference import final_split, label_ids, to_model_labels
from xlmr_mini.kd_loss import HiddenProjection, KDLossConfig, kd_taps
from xlmr_mini.kd_step import (StepContext, Trained, bf16_frozen_linears, compile_forward_loss, linear_schedule,
                               make_optimizer)
from xlmr_mini.model import XLMRClassifier
from xlmr_mini.step_impl import StepPlan
from xlmr_mini.tokenizer import Tokenizer
from xlmr_mini.train_config import DEMO_EPOCHS, DEMO_LR, PAPER_EPOCHS, PAPER_LR, TrainConfig
from xlmr_mini.vocab import (WORD_KEY, VocabTrim, always_kept, kept_ids, offload_rows, trim_config,
                            trim_state_dict)


@dataclasses.dataclass
class Setup:
    task: TaskData
    tokenizer_file: Path
    tokenizer: Tokenizer  # loaded once: XLM-R's tokenizer.json takes seconds to read
    teacher_dir: Path | None  # the teacher used for init and/or KD (None: no teacher)
    labels: tuple[str, ...]  # the model's label order
    splits: dict[str, EncodedSplit]  # train, dev (the examples that select the checkpoint), final
    final_name: str  # the reported split: test, else dev
    final_note: str
    select_langs: tuple[str, ...] = ()  # the dev languages that select the checkpoint
    arch: XLMRConfig | None = None  # sizes for from-scratch when there is no teacher or base
    epochs: int = PAPER_EPOCHS
    lr: float = PAPER_LR
    # The vocabulary the model trains on: the tokens of these splits (ids in `splits` renumbered
    # to it); None with --no-trim (full vocabulary, the tokenizer's ids).
    vocab: VocabTrim | None = None


def demo_banner() -> str:
    return ("This is the built-in demo (a synthetic 6-language task, no downloads). On real data: "
            "python -m xlmr_mini.train --data tsm:PATH --teacher TEACHER_DIR --init from-teacher (see --help).")


def prepare(cfg: TrainConfig, teacher_dir: Path | None = None, arch: XLMRConfig | None = None) -> Setup:
    """Load and check the data, tokenizer and labels; the demo's teacher is passed in `teacher_dir`."""
    check_inputs(cfg)
    task = load_task(cfg.data or "demo", cache_dir=cfg.cache_dir)
    teacher_dir = Path(cfg.teacher) if cfg.teacher else teacher_dir
    tok = find_tokenizer(teacher_dir) if teacher_dir else None
    tok = tok or (find_tokenizer(cfg.base) if cfg.base else None) or task.tokenizer_path
    if tok is None:
        raise InputError("no tokenizer.json found beside --teacher or --base, and the data brings none")
    tokenizer = Tokenizer(tok)
    for flag, model in (("--teacher", teacher_dir), ("--base", cfg.base)):
        if model is not None:
            check_tokenizer(tokenizer.vocab_size, tok, XLMRConfig.from_hf(model), f"{flag} {model}")
    labels = XLMRConfig.from_hf(teacher_dir).id2label if teacher_dir else task.labels
    where = f"teacher {teacher_dir}" if teacher_dir else "model"
    remap = label_ids(task.labels, labels, where)
    final_name, note = final_split(task)
    splits = _encode(cfg, task, tokenizer, remap, final_name)
    _check_save_vocab(cfg, Path(tok))
    vocab = None if cfg.no_trim else task_vocab(splits, tokenizer)
    if vocab is not None:
        splits = {name: vocab.to_task(enc) for name, enc in splits.items()}
    setup = Setup(task=task, tokenizer_file=Path(tok), tokenizer=tokenizer, teacher_dir=teacher_dir, labels=labels,
                  splits=splits, final_name=final_name, final_note=note, arch=arch, vocab=vocab,
                  select_langs=tuple(sorted(set(splits["dev"].langs))),
                  epochs=cfg.epochs or (DEMO_EPOCHS if cfg.is_demo else PAPER_EPOCHS),
                  lr=cfg.lr if cfg.lr is not None else (DEMO_LR if cfg.is_demo else PAPER_LR))
    check_models(cfg, setup)
    return setup


def check_inputs(cfg: TrainConfig) -> None:
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
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise InputError("--report-to tensorboard: the tensorboard package is not installed; "
                         "pip install -e \".[tensorboard]\"")
    for flag, model in (("--teacher", cfg.teacher), ("--base", cfg.base)):
        if model is not None:
            check_model_dir(model, flag)
    if cfg.out is not None:
        check_output_dir(cfg.out, "--out")
    if cfg.cache_dir is not None:
        check_output_dir(cfg.cache_dir, "--cache-dir")


def _encode(cfg: TrainConfig, task: TaskData, tok: Tokenizer, remap: np.ndarray, final_name: str) -> dict:
    if "train" not in task.splits or "dev" not in task.splits:
        raise InputError(f"{task.source}: training needs a train and a dev split (found: {', '.join(task.splits)})")
    train = select_languages(task.splits["train"], cfg.train_langs, task)
    # The subset is the data's, not the run's: every seed and init trains on the same examples.
    train = stratified_subset(train, cfg.subset, seed=0)
    # Zero-shot runs select on the training languages' dev examples only: held-out languages'
    # labels must not pick the checkpoint that is then reported on them.
    dev = task.splits["dev"] if cfg.select_on == "all" else select_languages(task.splits["dev"], cfg.train_langs, task)
    parts = {"train": train, "dev": dev, "final": task.splits[final_name]}
    return {name: encode_split(to_model_labels(split, remap), tok, cfg.max_length, cache_dir=cfg.cache_dir)
            for name, split in parts.items()}


def _check_save_vocab(cfg: TrainConfig, tokenizer_file: Path) -> None:
    if cfg.save_vocab != "task":
        return
    if cfg.no_trim:
        raise InputError("--save-vocab task: the model is trimmed as it trains; drop --no-trim")
    kind = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("model", {}).get("type")
    if kind != "Unigram":
        raise InputError(f"--save-vocab task: {tokenizer_file} is a {kind} tokenizer; only Unigram ones (XLM-R's) "
                         f"can be trimmed")


def task_vocab(splits: dict[str, EncodedSplit], tokenizer: Tokenizer) -> VocabTrim:
    """The rows training needs: every token of every split the student runs on (train, dev, the
    reported split: a row of a token seen only in evaluation is never trained, but it is looked
    up), and the tokenizer's special tokens. Training on these rows alone is exact (see `vocab`)."""
    spec = json.loads(tokenizer.path.read_text(encoding="utf-8"))
    return kept_ids((enc.tokens for enc in splits.values()), tokenizer.vocab_size, always_kept(spec))


def student_spec(cfg: TrainConfig, setup: Setup) -> StudentSpec:
    layers = cfg.layers
    if layers is None and cfg.layer_map is None and setup.teacher_dir is not None:
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


def check_models(cfg: TrainConfig, setup: Setup) -> None:
    """What the student's and teacher's sizes must satisfy, from their config.json alone: checked
    before the run writes anything."""
    teacher_cfg = XLMRConfig.from_hf(setup.teacher_dir) if setup.teacher_dir is not None else None
    base_cfg = XLMRConfig.from_hf(cfg.base) if cfg.base is not None else None
    # The config the student's sizes come from, as `initial_student` takes it.
    source = base_cfg if cfg.init == "from-base" else teacher_cfg or base_cfg or setup.arch
    if source is None:
        raise InputError("--init from-scratch: give --teacher or --base to take the sizes from")
    scfg = student_config(source, student_spec(cfg, setup))
    check_max_length(cfg.max_length, scfg)
    if cfg.no_kd:
        return
    if teacher_cfg.id2label != scfg.id2label:
        raise InputError(f"teacher {setup.teacher_dir}: labels {teacher_cfg.id2label} disagree with the student's "
                         f"{scfg.id2label}")
    if teacher_cfg.num_attention_heads != scfg.num_attention_heads:
        raise InputError(f"attention distillation compares heads one to one: the student has "
                         f"{scfg.num_attention_heads} heads, the teacher {teacher_cfg.num_attention_heads}; "
                         f"keep --heads at the teacher's or use --no-kd")
    if teacher_cfg.vocab_size != scfg.vocab_size:
        raise InputError(f"teacher {setup.teacher_dir}: vocabulary {teacher_cfg.vocab_size} differs from the "
                         f"student's {scfg.vocab_size}; both must share one tokenizer")


def load_teacher(setup: Setup, device, vocab: VocabTrim | None = None, bf16: bool = False) -> XLMRClassifier:
    """The frozen teacher (its sizes checked by `check_models`); with `vocab`, only its kept
    word-embedding rows (the same lookups); with `bf16`, its Linear weights stored in bf16."""
    tcfg, state = read_hf_state_dict(setup.teacher_dir)
    if vocab is not None:
        tcfg, state = trim_config(tcfg, vocab), trim_state_dict(state, vocab)
    teacher = build_model(tcfg, state, device=device).eval().requires_grad_(False)
    return bf16_frozen_linears(teacher) if bf16 else teacher


def build_context(cfg: TrainConfig, setup: Setup, seed: int, device, total_steps: int, plan: StepPlan) -> StepContext:
    """The seed's models, optimizer and schedule; the KD loss and compilation as `plan` says."""
    torch.manual_seed(seed)
    scfg, sd = initial_student(cfg, setup, seed)
    scfg = with_dropout(cfg, scfg)
    vocab = None
    if setup.vocab is not None:
        rows = offload_rows(sd[WORD_KEY], Path(cfg.cache_dir or default_cache_dir()) / "tmp")  # read only by saves
        vocab = dataclasses.replace(setup.vocab, full_size=scfg.vocab_size, initial_rows=rows)
        scfg, sd = trim_config(scfg, vocab), trim_state_dict(sd, vocab)
    student = build_model(scfg, sd, device=device, dtype=torch.float32).train()
    student.recompute = cfg.recompute
    loss_cfg = KDLossConfig(kd=not cfg.no_kd, att_target=cfg.att_target, hid_proj=cfg.hid_proj, impl=plan.kd_impl,
                            loss_norm=cfg.loss_norm)
    tcfg, proj, lmap = None, None, []
    if loss_cfg.kd:
        tcfg = XLMRConfig.from_hf(setup.teacher_dir)
        lmap = layer_map(tcfg.num_hidden_layers, scfg.num_hidden_layers, cfg.layer_map)
        proj = HiddenProjection(scfg.hidden_size, tcfg.hidden_size, cfg.hid_proj).to(device)
    params = list(student.parameters()) + (list(proj.parameters()) if proj is not None else [])
    optimizer = make_optimizer(params, setup.lr, cfg.weight_decay)
    bf16 = cfg.precision == "bf16"  # resolved by `resolve_run_precision`
    teacher, cache = None, None
    if loss_cfg.kd:
        load = functools.partial(load_teacher, setup, device, vocab, bf16)
        cache = teacher_cache.for_run(cfg, setup, tcfg, kd_taps(loss_cfg, lmap), bf16, device, total_steps, load)
        # The fused loss's check compares it with the reference, which reads other taps than the
        # cache holds: the live teacher serves the check (`settle_teacher` then drops one of them).
        teacher = load() if cache is None or plan.check_fused else None
    ctx = StepContext(student=student, teacher=teacher, proj=proj, loss_cfg=loss_cfg, layer_map=lmap,
                      optimizer=optimizer, params=params,
                      scheduler=linear_schedule(optimizer, total_steps, math.ceil(cfg.warmup_ratio * total_steps)),
                      max_grad_norm=cfg.max_grad_norm, vocab=vocab, bf16=bf16, teacher_cache=cache)
    if plan.compiled:
        ctx.loss_fn = compile_forward_loss()
    ctx.parallel = distributed.wrap(Trained(student, proj))  # None on one process
    return ctx


def settle_teacher(ctx: StepContext) -> None:
    """After the first batch's check: the teacher cache when it holds the taps of the loss that
    runs (the live teacher is then dropped), else the live teacher (the check fell back from the
    fused loss, whose taps the cache holds)."""
    if ctx.teacher_cache is None:
        return
    if ctx.teacher_cache.spec.taps == kd_taps(ctx.loss_cfg, ctx.layer_map):
        ctx.teacher = None
    else:
        print("teacher cache: off (it holds the fused loss's taps, and the run fell back to the reference)")
        ctx.teacher_cache = None


def with_dropout(cfg: TrainConfig, student_cfg: XLMRConfig) -> XLMRConfig:
    """The student's config with --dropout (hidden states; the head follows it) and
    --attention-dropout applied."""
    changes = {}
    if cfg.dropout is not None:
        changes.update(hidden_dropout_prob=cfg.dropout, classifier_dropout=None)
    if cfg.attention_dropout is not None:
        changes["attention_probs_dropout_prob"] = cfg.attention_dropout
    return student_cfg.replace(**changes)


def resolve_run_precision(cfg: TrainConfig, setup: Setup, device) -> TrainConfig:
    """`cfg` with --precision resolved for this hardware and the widest model of the run (which
    sets the matmul sizes): the student, and the teacher when it distils. The resolved value is
    part of the run's identity, so an fp32 run and a bf16 run never share a directory."""
    def width(path) -> int:
        return XLMRConfig.from_hf(path).hidden_size

    source = {"from-teacher": setup.teacher_dir, "from-base": cfg.base}.get(cfg.init) or setup.teacher_dir or cfg.base
    arch = setup.arch.hidden_size if setup.arch is not None else 0  # none: initial_student says what is missing
    student = cfg.hidden or (width(source) if source is not None else arch)
    hidden = max(student, width(setup.teacher_dir) if not cfg.no_kd and setup.teacher_dir is not None else 0)
    precision = resolve_precision(cfg.precision, device, hidden, cfg.cache_dir or default_cache_dir())
    return dataclasses.replace(cfg, precision=precision)
