"""Measured step rates for the study's time estimates: a few real optimizer steps of each model
shape a study trains (the teacher without KD; half-depth students, full and half width, with and
without KD), on a real batch of the data, with randomly initialized weights of the base's sizes
and the vocabulary training keeps (the rows of the data's tokens, `run_setup.task_vocab`; not
XLM-R's 250k rows, whose embedding and optimizer update would dominate the time).
"""
import time
from pathlib import Path

import torch

from xlmr_mini.checkpoint import build_model
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import StudentSpec, layer_map, scratch_state_dict, student_config
from xlmr_mini.data import TaskData, default_cache_dir, encode_split, epoch_batches
from xlmr_mini.hardware import resolve_device, resolve_precision, synchronize
from xlmr_mini.kd_loss import HiddenProjection, KDLossConfig
from xlmr_mini.kd_step import StepContext, bf16_frozen_linears, linear_schedule, make_optimizer, train_step
from xlmr_mini.run_setup import task_vocab
from xlmr_mini.study_plan import Run, StudySettings, common_flags, flags_to_argv, train_config
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


def measure_step_seconds(s: StudySettings, base_cfg: XLMRConfig, task: TaskData):
    """run -> measured seconds per optimizer step of a model of that run's shape."""
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
    finally:
        torch.set_num_threads(threads)

    def seconds_per_step(run: Run) -> float:
        if "--teacher" not in run.argv:
            return rates[("teacher", False)]
        width = "half" if "--hidden" in run.argv else "full"
        return rates[(width, "--no-kd" not in run.argv)]

    return seconds_per_step

