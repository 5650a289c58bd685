"""Measured step rates for the study's time estimates: a few real optimizer steps of each model
shape a study trains (the teacher without KD; half-depth students, full and half width, with and
without KD) and the teacher's forward pass alone, on a real batch of the data, with randomly
initialized weights of the base's sizes and the vocabulary training keeps (the rows of the data's
tokens, `run_setup.task_vocab`; not XLM-R's 250k rows, whose embedding and optimizer update would
dominate the time); and the size of each teacher cache the study builds.
"""
import time
from pathlib import Path

import torch

from xlmr_mini.checkpoint import build_model
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import StudentSpec, layer_map, scratch_state_dict, student_config
from xlmr_mini.data import (TaskData, default_cache_dir, encode_split, epoch_batches, select_languages,
                            stratified_subset)
from xlmr_mini.hardware import resolve_device, resolve_precision, synchronize
from xlmr_mini.kd_loss import HiddenProjection, KDLossConfig, kd_taps
from xlmr_mini.kd_step import (StepContext, bf16_frozen_linears, linear_schedule, make_optimizer, teacher_forward,
                               train_step)
from xlmr_mini.run_setup import task_vocab
from xlmr_mini.step_impl import plan_step
from xlmr_mini.study_plan import Run, StudySettings, common_flags, flags_to_argv, train_config
from xlmr_mini.teacher_cache import CacheSpec, cache_bytes, field_dtypes
from xlmr_mini.tokenizer import Tokenizer
from xlmr_mini.train_config import TrainConfig
from xlmr_mini.vocab import trim_config

PROBE_STEPS = 3  # timed, after one warm-up step


def _context(probe: TrainConfig, teacher_cfg: XLMRConfig, spec: StudentSpec | None, kd: bool, device) -> StepContext:
    """A step context as `run_setup.build_context` makes it for such a run, its precision included
    (bf16 on a GPU with bf16: a study timed in fp32 there overestimated its runs)."""
    teacher = build_model(teacher_cfg, scratch_state_dict(teacher_cfg, 0), device=device)
    if spec is None:  # the teacher itself is trained, without KD
        student, teacher, lmap = teacher.train(), None, []
    else:
        scfg = student_config(teacher_cfg, spec)
        student = build_model(scfg, scratch_state_dict(scfg, 1), device=device).train()
        lmap = layer_map(teacher_cfg.num_hidden_layers, scfg.num_hidden_layers)
        teacher = teacher.eval().requires_grad_(False) if kd else None
    student.recompute = probe.recompute  # --recompute's layers run twice: the estimate times that
    proj = HiddenProjection(student.cfg.hidden_size, teacher_cfg.hidden_size).to(device) if kd else None
    params = list(student.parameters()) + (list(proj.parameters()) if proj is not None else [])
    optimizer = make_optimizer(params, 1e-5, 0.0)
    hidden = max(student.cfg.hidden_size, teacher.cfg.hidden_size if teacher is not None else 0)  # as a run resolves it
    bf16 = resolve_precision(probe.precision, device, hidden, probe.cache_dir or default_cache_dir()) == "bf16"
    if bf16 and teacher is not None:
        bf16_frozen_linears(teacher)
    return StepContext(student=student, teacher=teacher, proj=proj, loss_cfg=KDLossConfig(kd=kd), layer_map=lmap,
                       optimizer=optimizer, scheduler=linear_schedule(optimizer, 100), params=params, bf16=bf16)


def _seconds(ctx: StepContext, batch: dict, device) -> float:
    train_step(ctx, batch, device)
    synchronize(device)  # a GPU runs a step after the host has queued it: time the GPU's work
    t0 = time.perf_counter()
    for _ in range(PROBE_STEPS):
        train_step(ctx, batch, device)
    synchronize(device)
    return (time.perf_counter() - t0) / PROBE_STEPS


def _teacher_seconds(ctx: StepContext, batch: dict, device) -> float:
    """The KD step's teacher forward alone: what a run saves per step when it reads a teacher cache."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    teacher_forward(ctx, ids, mask)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(PROBE_STEPS):
        teacher_forward(ctx, ids, mask)
    synchronize(device)
    return (time.perf_counter() - t0) / PROBE_STEPS


def measure_step_seconds(s: StudySettings, base_cfg: XLMRConfig, task: TaskData):
    """run -> measured seconds per unit of work of a model of that run's shape: per optimizer step
    (KD students without their teacher's forward pass, which the study's teacher cache stage
    computes once; with it, under `--teacher-cache off`), and per example for a teacher cache
    (`cache_teacher` runs)."""
    argv = flags_to_argv({**common_flags(s, "3.2"), "init": "from-scratch", "no-kd": True})
    probe = train_config(Run(name="probe", tool="train", argv=argv), Path("x"))
    device = resolve_device(probe.device)
    threads = torch.get_num_threads()
    if probe.num_threads:
        torch.set_num_threads(probe.num_threads)
    try:
        tok_file = task.tokenizer_path or Path(s.base) / "tokenizer.json"
        tok = Tokenizer(tok_file)
        encoded = {name: encode_split(split, tok, probe.max_length, cache_dir=probe.cache_dir)
                   for name, split in task.splits.items()}
        vocab = task_vocab(encoded, tok)  # every split's tokens: what a run of this data keeps
        batch = epoch_batches(vocab.to_task(encoded["train"]), probe.batch_size, seed=0, epoch=0,
                              pad_id=tok.pad_id)[0]  # special tokens keep their ids, as in training
        teacher_cfg = trim_config(base_cfg.replace(id2label=task.labels), vocab)
        half = StudentSpec(layers=max(1, base_cfg.num_hidden_layers // 2))
        narrow = StudentSpec(layers=half.layers, hidden=base_cfg.hidden_size // 2)
        rates = {("teacher", False): _seconds(_context(probe, teacher_cfg, None, False, device), batch, device)}
        for width, spec in (("full", half), ("half", narrow)):
            for kd in (False, True):
                rates[(width, kd)] = _seconds(_context(probe, teacher_cfg, spec, kd, device), batch, device)
        forward = _teacher_seconds(_context(probe, teacher_cfg, half, True, device), batch, device)
    finally:
        torch.set_num_threads(threads)

    def seconds_per_step(run: Run) -> float:
        if run.tool == "cache_teacher":
            return forward / len(batch["labels"])
        if "--teacher" not in run.argv:
            return rates[("teacher", False)]
        width = "half" if "--hidden" in run.argv else "full"
        kd = "--no-kd" not in run.argv
        return max(rates[(width, kd)] - forward, 0.0) if kd and s.teacher_cache else rates[(width, kd)]

    return seconds_per_step



def cache_sizer(s: StudySettings, base_cfg: XLMRConfig, task: TaskData):
    """`cache_teacher` run -> the bytes of the cache it writes (from the tokenized split's lengths)."""
    tok = Tokenizer(task.tokenizer_path or Path(s.base) / "tokenizer.json")

    def size(run: Run) -> int:
        cfg = train_config(run, Path("x"))
        split = stratified_subset(select_languages(task.splits["train"], cfg.train_langs, task), cfg.subset, seed=0)
        enc = encode_split(split, tok, cfg.max_length, cache_dir=cfg.cache_dir)
        lmap = layer_map(base_cfg.num_hidden_layers, cfg.layers or max(1, base_cfg.num_hidden_layers // 2),
                         cfg.layer_map)
        device = resolve_device(cfg.device)
        precision = resolve_precision(cfg.precision, device, base_cfg.hidden_size, cfg.cache_dir or default_cache_dir())
        impl = plan_step(cfg.kd_impl, cfg.compile, device, True, cfg.loss_norm).kd_impl  # as the run resolves it
        spec = CacheSpec(teacher="", split="", taps=kd_taps(KDLossConfig(att_target=cfg.att_target, impl=impl), lmap),
                         precision=precision, device=device.type, hidden=base_cfg.hidden_size,
                         heads=base_cfg.num_attention_heads, labels=len(task.labels))
        return cache_bytes(spec, enc.lengths, field_dtypes(spec, device))

    return size
