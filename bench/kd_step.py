"""The full KD train step: xlmr_mini vs the usual TinyBERT-style step written on transformers.

One step = teacher forward (no grad) + student forward/backward + TinyBERT loss + gradient
clipping + AdamW, at the paper's shapes: teacher 12L/768 (12 heads, 3072), students 6L/768 and
6L/384 (12 heads, 1536), vocabulary 250,002, batch 32 with padding (lengths T/2..T), T 64 and 128.

Implementations (`--impls`):

- transformers, transformers-bf16: both models `XLMRobertaForSequenceClassification` with eager
  attention and `output_attentions` / `output_hidden_states` (all 12 teacher layers' maps
  materialized), the loss summed in Python over the mapped layers (attention probabilities,
  which is what transformers returns; hidden states through fit_dense; embeddings; logits MSE;
  cross-entropy), `torch.optim.AdamW` as people usually create it; fp32, or everything under
  bf16 autocast.
- xlmr_mini: the project's default, as `python -m xlmr_mini.train` sets it up (`--kd-impl auto`
  and `--compile auto`, self-checked on the first batch: on CUDA fused and compiled, on CPU the
  reference, eager; the JSON says what ran): the student and
  teacher on the task's vocabulary rows (`--kept` of them, default 34,855: what tweet_sentiment_
  multilingual's texts use; the batch draws its tokens from them), `--precision auto` resolved on
  this machine, the initial full embedding rows held for writing the full-vocabulary model, and
  training's default `--kd-impl` (the row is labelled with it).
- xlmr_mini-fp32, xlmr_mini-bf16: the same with the precision pinned.
- xlmr_mini-fused: the default with `--kd-impl fused` (the Triton kernels on a GPU).
- xlmr_mini-full-vocab: fp32 on the whole 250,002-row table (`--no-trim`).
- xlmr_mini-compiled: the default with `--compile on`'s compiled forward+loss.
- transformers-bf16-trimmed: transformers-bf16 on a vocabulary trimmed beforehand to the task's
  rows (what a user who knows vocabtrimmer does): the well-tuned baseline at equal settings.
- transformers-trimmed: the same in fp32, the well-tuned baseline on a CPU whose bf16 matmuls
  are slower than fp32 ones (where `--precision auto` picks fp32).
- xlmr_mini-cached: the default reading the teacher's outputs from a `teacher_cache` built over
  the timed batches first (an epoch after the first; the build is not timed): no teacher forward.
- xlmr_mini-cached-compiled: the same with `--compile on` (training's compile: one static graph,
  then one with a dynamic sequence length for every other length).
- xlmr_mini-cached-padded: the other way to bound the graphs on length-bucketed batches: each
  batch padded to the next of `--pad-sizes` (padded positions are masked out of every loss term)
  and compiled with `dynamic=False`, a static graph per size (and per batch size). With --data,
  the notes give the epoch's padded tokens in both layouts and the graphs each compiled.
- xlmr_mini-cached-recompute: xlmr_mini-cached with `--recompute` (each student layer's
  activations recomputed in the backward pass); transformers-trimmed-recompute and
  transformers-bf16-trimmed-recompute: the trimmed baselines with transformers' own
  `gradient_checkpointing_enable()`, the same trade on its side.

Each implementation runs in its own process so that peak memory is its own: the peak during the
timed steps of everything the process holds (weights, optimizer state, activations) above the
process's size before the models were built. On CPU the process runs with a low
MALLOC_MMAP_THRESHOLD_, so freed tensors leave the resident set and the sampled RSS follows
live memory.

    python -m bench.kd_step                       # full run, appends to bench/RESULTS.md
    python -m bench.kd_step --json                # one JSON object per implementation, nothing recorded
    python -m bench.kd_step --quick               # tiny shapes, prints only
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.epoch_padding import pad_to
from bench.harness import append_results, measure, rss_mb

IMPLS = ("transformers", "transformers-bf16", "transformers-bf16-trimmed", "transformers-trimmed", "xlmr_mini",
         "xlmr_mini-fp32", "xlmr_mini-bf16", "xlmr_mini-fused", "xlmr_mini-full-vocab", "xlmr_mini-compiled",
         "xlmr_mini-cached", "xlmr_mini-cached-compiled", "xlmr_mini-cached-padded", "xlmr_mini-cached-recompute",
         "transformers-trimmed-recompute", "transformers-bf16-trimmed-recompute")
DEFAULT_IMPLS = ("transformers", "transformers-bf16", "xlmr_mini", "xlmr_mini-fp32", "xlmr_mini-bf16")
PAD_SIZES = (16, 32, 64, 128)  # xlmr_mini-cached-padded's default lengths
TSM_KEPT = 34_855  # distinct XLM-R pieces over every tweet_sentiment_multilingual split, plus specials


def shapes(args, student_hidden):
    t = dict(layers=12, hidden=768, heads=12, inter=3072)
    s = dict(layers=6, hidden=student_hidden, heads=12, inter=4 * student_hidden)
    if args.quick:
        t, s = dict(layers=4, hidden=64, heads=4, inter=128), dict(layers=2, hidden=student_hidden // 12, heads=4,
                                                                   inter=student_hidden // 3)
    return t, s


def kept_vocab(args) -> np.ndarray:
    """The task's vocabulary rows: with --data, what its texts use (as `train` computes it); else
    the specials and `--kept` - 4 other ids, sorted (fixed seed)."""
    if args.data:
        return real_data(args)[0]
    rng = np.random.default_rng(0)
    others = rng.choice(np.arange(4, args.vocab), size=min(args.kept, args.vocab) - 4, replace=False)
    return np.sort(np.concatenate([np.arange(4), others])).astype(np.int64)


def real_data(args):
    """(kept ids, sampled batches) of a real epoch: tsm's seen-language train split, XLM-R's
    tokenizer, length-bucketed dynamic padding as `train` batches it; `--sample-batches` batches
    at evenly spaced positions of the epoch."""
    from xlmr_mini.data import encode_split, epoch_batches, load_task, select_languages
    from xlmr_mini.run_setup import task_vocab
    from xlmr_mini.tokenizer import Tokenizer

    key = (args.data, args.tokenizer, args.batch, args.sample_batches)
    if key in _REAL:
        return _REAL[key]
    task = load_task(f"tsm:{args.data}")
    tok = Tokenizer(args.tokenizer)
    splits = {name: encode_split(split, tok, 128) for name, split in task.splits.items()}
    train = encode_split(select_languages(task.splits["train"], "seen", task), tok, 128)
    batches = epoch_batches(train, args.batch, seed=0, epoch=0, pad_id=tok.pad_id)
    picks = np.linspace(0, len(batches) - 1, args.sample_batches).round().astype(int)
    kept = task_vocab(splits, tok).kept
    _REAL[key] = kept, [batches[i] for i in picks], len(train), batches
    return _REAL[key]


def pad_length(length: int, sizes) -> int:
    """The smallest of `sizes` that holds `length` (the largest when none does)."""
    return next((n for n in sorted(sizes) if n >= length), max(sizes))


def padding_notes(args) -> list[str]:
    """The epoch's tokens as `train` pads them and padded to --pad-sizes, and the graphs each compiles."""
    batches = real_data(args)[3]
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    bucketed = sum(r * n for r, n in shapes)
    to_sizes = sum(r * pad_length(n, args.pad_sizes) for r, n in shapes)
    static = {(r, pad_length(n, args.pad_sizes)) for r, n in shapes}
    return [f"an epoch's tokens: {real:,} real, {bucketed:,} as `train` pads each batch to its longest row "
            f"({bucketed / real:.2f}x), {to_sizes:,} padded to {list(args.pad_sizes)} ({to_sizes / real:.2f}x)",
            f"graphs an epoch compiles: training's dynamic compile 2 (the first length, then a dynamic length; 3 if "
            f"the batch size also varies: {len({r for r, _ in shapes})} batch sizes), padded to sizes {len(static)} "
            f"(one per (rows, length) shape)"]


_REAL = {}  # real_data's result per (data, tokenizer, batch, sample batches): tokenizing tsm takes seconds


def workload(args, device):
    """[(input_ids in the full numbering, mask, labels)]: the sampled real batches, or one
    synthetic batch with tokens drawn from the kept rows."""
    if args.data:
        return [(b["input_ids"].to(device), b["attention_mask"].to(device), (b["labels"] % 3).to(device))
                for b in real_data(args)[1]]
    return [batch(args, device)]


def batch(args, device):
    g = torch.Generator().manual_seed(0)
    kept = torch.from_numpy(kept_vocab(args))
    ids = kept[torch.randint(4, len(kept), (args.batch, args.seq), generator=g)]
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=g)
    mask = (torch.arange(args.seq)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 0
    ids[mask == 0] = 1
    labels = torch.randint(0, 3, (args.batch,), generator=g)
    return ids.to(device), mask.to(device), labels.to(device)


def transformers_step(args, t, s, device, bf16, trimmed=False, recompute=False):
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    kept = kept_vocab(args)
    vocab_size = len(kept) if trimmed else args.vocab

    def model(c):
        cfg = XLMRobertaConfig(vocab_size=vocab_size, hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                               num_attention_heads=c["heads"], intermediate_size=c["inter"], num_labels=3,
                               type_vocab_size=1, layer_norm_eps=1e-5, attn_implementation="eager")
        return XLMRobertaForSequenceClassification(cfg).to(device)

    teacher, student = model(t).eval(), model(s).train()
    if recompute:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fit_dense = torch.nn.Linear(s["hidden"], t["hidden"]).to(device)
    params = list(student.parameters()) + list(fit_dense.parameters())
    opt = torch.optim.AdamW(params, lr=5e-5)
    divisor = t["layers"] // s["layers"]
    data = workload(args, device)
    if trimmed:  # the ids renumbered to the trimmed table, as vocabtrimmer's tokenizer would give them
        table = torch.full((args.vocab,), -1, dtype=torch.long)
        table[torch.from_numpy(kept)] = torch.arange(len(kept))
        data = [(table[ids.cpu()].to(device), mask, labels) for ids, mask, labels in data]

    def one(ids, mask, labels, bf16):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                to = teacher(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
            so = student(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
            att = sum(F.mse_loss(a, to.attentions[(i + 1) * divisor - 1]) for i, a in enumerate(so.attentions))
            hid = sum(F.mse_loss(fit_dense(h), to.hidden_states[i * divisor]) for i, h in enumerate(so.hidden_states))
            loss = att + hid + F.mse_loss(so.logits, to.logits) + F.cross_entropy(so.logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step(bf16=bf16):  # the precision can be switched per call: the interleaved timing shares one build
        return [one(*b, bf16) for b in data]

    return step


def kd_impl(impl: str) -> str:
    """The KD loss implementation an xlmr_mini row runs: training's default unless named."""
    from xlmr_mini.train_config import TrainConfig

    return "fused" if impl == "xlmr_mini-fused" else TrainConfig().kd_impl


def kd_label(step_impl: dict, device) -> str:
    """What computed an implementation's KD loss (`StepPlan.record`, empty for transformers), for
    its row: fused runs PyTorch where Triton does not run (CPU without TRITON_INTERPRET=1)."""
    from xlmr_mini.kernels import _dispatch

    if not step_impl:
        return "-"
    name = step_impl["kd_impl"]["used"]
    return name if name != "fused" or _dispatch._triton_for(device.type) else "fused (PyTorch fallback)"


def cache_teacher_outputs(ctx, data, t, precision, device) -> None:
    """Give `ctx` a teacher cache of `data`'s rows (built here, untimed) and drop its teacher; each
    batch gets the `index` of its rows, as training's batches carry it."""
    import tempfile
    from pathlib import Path

    from xlmr_mini.data import EncodedSplit
    from xlmr_mini.kd_loss import kd_taps
    from xlmr_mini.teacher_cache import CacheSpec, TeacherCache, build, field_dtypes

    rows = [ids[m.bool()].cpu().numpy() for b in data for ids, m in zip(b["input_ids"], b["attention_mask"])]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    enc = EncodedSplit(np.concatenate(rows).astype(np.int32), offsets, np.zeros(len(rows), dtype=np.int64),
                       ["x"] * len(rows))
    spec = CacheSpec(teacher="bench", split="bench", taps=kd_taps(ctx.loss_cfg, ctx.layer_map), precision=precision,
                     device=device.type, hidden=t["hidden"], heads=t["heads"], labels=3)
    dtypes = field_dtypes(spec, device)
    path = Path(tempfile.mkdtemp(prefix="kd-step-cache-")) / "cache"
    build(path, spec, enc, dtypes, ctx.teacher, pad_id=1, device=device)
    ctx.teacher_cache, ctx.teacher = TeacherCache(path, spec, enc.lengths, dtypes), None
    start = 0
    for b in data:
        b["index"] = torch.arange(start, start + len(b["labels"]))
        start += len(b["labels"])


def xlmr_mini_step(args, t, s, device, precision, trimmed, compiled, loss_impl, cached=False, pad=False,
                   recompute=False):
    from pathlib import Path

    from xlmr_mini.checkpoint import build_model, hf_state_dict
    from xlmr_mini.config import XLMRConfig
    from xlmr_mini.data import default_cache_dir
    from xlmr_mini.hardware import resolve_precision
    from xlmr_mini.kd_loss import HiddenProjection, KDLossConfig
    from xlmr_mini.kd_step import (
        StepContext, bf16_frozen_linears, compile_forward_loss, linear_schedule, make_optimizer, train_step,
    )
    from xlmr_mini.model import XLMRClassifier, init_weights
    from xlmr_mini.step_impl import check_step, plan_step
    from xlmr_mini.vocab import WORD_KEY, VocabTrim, offload_rows, trim_config, trim_state_dict

    vocab = VocabTrim(kept=kept_vocab(args), full_size=args.vocab) if trimmed else None

    def model(c):
        cfg = XLMRConfig(vocab_size=args.vocab, hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                         num_attention_heads=c["heads"], intermediate_size=c["inter"], id2label=("a", "b", "c"))
        m = XLMRClassifier(cfg)
        init_weights(m, cfg.initializer_range)
        if vocab is None:
            return m.to(device), None
        state = hf_state_dict(m)  # as run_setup does: the full rows kept aside, the model on the task's rows
        return build_model(trim_config(cfg, vocab), trim_state_dict(state, vocab), device=device), state[WORD_KEY]

    (teacher, _), (student, initial_rows) = model(t), model(s)
    teacher.eval().requires_grad_(False)
    student.train()
    student.recompute = recompute
    if vocab is not None:
        rows = offload_rows(initial_rows, Path(default_cache_dir()) / "tmp")  # as run_setup.build_context does
        vocab = VocabTrim(kept=vocab.kept, full_size=args.vocab, initial_rows=rows)
    proj = HiddenProjection(s["hidden"], t["hidden"], "linear").to(device)
    plan = plan_step(loss_impl, "on" if compiled or pad else "auto", device, True, "masked")  # as `train` resolves them
    loss_cfg = KDLossConfig(att_target=args.att_target, impl=plan.kd_impl)
    params = list(student.parameters()) + list(proj.parameters())
    opt = make_optimizer(params, 5e-5, 0.0)
    divisor = t["layers"] // s["layers"]
    resolved = resolve_precision(precision, device, t["hidden"], default_cache_dir())
    if resolved == "bf16":
        bf16_frozen_linears(teacher)  # as run_setup.build_context does
    ctx = StepContext(student=student, teacher=teacher, proj=proj, loss_cfg=loss_cfg,
                      layer_map=[(i + 1) * divisor - 1 for i in range(s["layers"])], optimizer=opt,
                      scheduler=linear_schedule(opt, 10**6), params=params, bf16=resolved == "bf16",
                      loss_fn=compile_forward_loss(dynamic=False if pad else None) if plan.compiled else None,
                      vocab=vocab)
    if pad:  # a static graph per (rows, length) shape, besides the other rows' graphs of the same function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    table = torch.from_numpy(vocab.old_to_new) if vocab is not None else None
    work = [(*pad_to({"input_ids": ids, "attention_mask": mask}, pad_length(ids.shape[1], args.pad_sizes), 1), labels)
            if pad else (ids, mask, labels) for ids, mask, labels in workload(args, device)]
    data = [{"input_ids": ids if table is None else table[ids.cpu()].to(device), "attention_mask": mask, "labels": labels}
            for ids, mask, labels in work]
    if cached:
        cache_teacher_outputs(ctx, data, t, resolved, device)
    plan = check_step(ctx, plan, data[0], device, default_cache_dir(), args.run_steps)
    return (lambda: [train_step(ctx, b, device) for b in data]), resolved, plan


def build(args, impl, t, s, device, shared=None):
    """(step function, precision, vocabulary rows, xlmr_mini's kd_impl and compile as run) of one
    implementation; `shared` reuses the transformers models for both of its precisions."""
    words = impl.split("-")
    if impl.startswith("transformers"):
        bf16, trimmed, recompute = "bf16" in words, "trimmed" in words, "recompute" in words
        precision = "bf16" if bf16 else "fp32"
        if shared is not None and not trimmed and not recompute:
            return (lambda: shared(bf16)), precision, args.vocab, {}
        step = transformers_step(args, t, s, device, bf16, trimmed=trimmed, recompute=recompute)
        return step, precision, len(kept_vocab(args)) if trimmed else args.vocab, {}
    wanted = {"xlmr_mini-fp32": "fp32", "xlmr_mini-bf16": "bf16", "xlmr_mini-full-vocab": "fp32"}.get(impl, "auto")
    trimmed = impl != "xlmr_mini-full-vocab"
    step, precision, plan = xlmr_mini_step(args, t, s, device, wanted, trimmed, "compiled" in words, kd_impl(impl),
                                           cached="cached" in words, pad="padded" in words,
                                           recompute="recompute" in words)
    return step, precision, len(kept_vocab(args)) if trimmed else args.vocab, plan.record()


def interleaved(args, impls, student_hidden, seq) -> dict:
    """Median s/step of each implementation, all built in this process and timed in turns (one
    step each per round, the order rotated): on a shared machine the load changes from minute to
    minute, and turns expose every implementation to the same load."""
    import statistics

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.student_hidden, args.seq = student_hidden, seq
    t, s = shapes(args, student_hidden)
    torch.manual_seed(0)
    shared = transformers_step(args, t, s, device, False) if any(i in ("transformers", "transformers-bf16")
                                                                 for i in impls) else None
    steps = {impl: build(args, impl, t, s, device, shared)[0] for impl in impls}
    for step in steps.values():
        step()  # warm-up (and compilation)
    times = {impl: [] for impl in impls}
    for r in range(args.rounds):
        for impl in impls[r % len(impls):] + impls[: r % len(impls)]:
            t0 = time.perf_counter()
            steps[impl]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[impl].append(time.perf_counter() - t0)
    return {impl: (statistics.median(ts), (max(ts) - min(ts)) / 2) for impl, ts in times.items()}


def run_one(args):
    """In a child process: build one implementation, time it, print one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t, s = shapes(args, args.student_hidden)
    torch.manual_seed(0)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = rss_mb()
    impl = args.one
    step, precision, rows, step_impl = build(args, impl, t, s, device)
    t0 = time.perf_counter()
    step()  # the first step apart: it includes any compilation
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    items = args.batch * (args.sample_batches if args.data else 1)
    m = measure(impl, step, items=items, warmup=0 if args.data else 1, repeats=args.repeats, device=device, mem_base_mb=base)
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(json.dumps({"implementation": impl, "student": f"6L/{args.student_hidden}", "seq": args.seq,
                      "batch": args.batch, "samples_per_s": m.rate, "s_per_step": m.median_s,
                      "spread_s": m.spread_s, "peak_mb": m.peak_mem_mb, "first_step_s": first_s,
                      "precision": precision, "device": device_name, "vocab_rows": rows,
                      "kd_impl": kd_label(step_impl, device), "step_impl": step_impl,
                      **({"epoch_examples": real_data(args)[2]} if args.data else {})}))


def spawn(args, impl, student_hidden, seq):
    cmd = [sys.executable, "-m", "bench.kd_step", "--one", impl, "--student-hidden", str(student_hidden),
           "--seq", str(seq), "--batch", str(args.batch), "--vocab", str(args.vocab), "--repeats", str(args.repeats),
           "--att-target", args.att_target, "--kept", str(args.kept), "--sample-batches", str(args.sample_batches),
           "--run-steps", str(args.run_steps), "--pad-sizes", *map(str, args.pad_sizes)]
    cmd += (["--quick"] if args.quick else []) + (["--data", args.data, "--tokenizer", args.tokenizer] if args.data else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.kd_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 128])
    p.add_argument("--students", type=int, nargs="+", default=[768, 384], help="student hidden sizes")
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS)
    p.add_argument("--vocab", type=int, default=250002)
    p.add_argument("--kept", type=int, default=TSM_KEPT, help="vocabulary rows the task uses (xlmr_mini trains on these)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per implementation in its own process")
    p.add_argument("--rounds", type=int, default=0, help="then time all implementations in one process, in turns, "
                   "this many rounds (the speeds reported; memory and first step stay the per-process ones)")
    p.add_argument("--att-target", default="probs", choices=("scores", "probs"))
    p.add_argument("--data", help="tweet_sentiment_multilingual directory: time real batches of an epoch instead")
    p.add_argument("--tokenizer", help="XLM-R tokenizer.json (with --data)")
    p.add_argument("--sample-batches", type=int, default=4, help="with --data: batches timed per repeat")
    p.add_argument("--run-steps", type=int, default=6900, help="the steps of the run whose --compile auto the "
                   "default decides (a paper tsm run: 30 epochs of 230 batches)")
    p.add_argument("--pad-sizes", type=int, nargs="+", default=list(PAD_SIZES),
                   help="xlmr_mini-cached-padded: the lengths batches are padded up to")
    p.add_argument("--baseline", default="transformers", choices=IMPLS,
                   help="the row the speed and memory ratios divide by (when it is among --impls)")
    p.add_argument("--json", action="store_true", help="print one JSON object per implementation; record nothing")
    p.add_argument("--quick", action="store_true", help="tiny shapes, prints only")
    p.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--student-hidden", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.kept, args.batch, args.seqs, args.repeats = 1000, 300, 4, [16], 1
    if args.one:
        return run_one(args)
    if args.data:
        args.seqs = [0]  # the real batches' own lengths
    rows, notes = [], []
    for student_hidden in args.students:
        for seq in args.seqs:
            results = {impl: spawn(args, impl, student_hidden, seq) for impl in args.impls}
            if args.rounds:
                items = args.batch * (args.sample_batches if args.data else 1)
                for impl, (median_s, spread_s) in interleaved(args, list(args.impls), student_hidden, seq).items():
                    results[impl].update(s_per_step=median_s, spread_s=spread_s, samples_per_s=items / median_s,
                                         timing="interleaved")
            base = results.get(args.baseline)
            for impl, r in results.items():
                if args.json:
                    print(json.dumps(r), flush=True)
                    continue
                speed = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
                mem = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base else "-"
                rows.append(f"| 6L/{student_hidden} | {seq or 'tsm (dynamic)'} | {impl} | {r['kd_impl']} | {r['precision']} "
                            f"| {r['vocab_rows']:,} "
                            f"| {r['s_per_step'] * 1e3:,.0f} ± {r['spread_s'] * 1e3:,.0f} | {r['samples_per_s']:,.2f} "
                            f"| {speed} | {r['peak_mb']:,.0f} | {mem} | {r['first_step_s']:,.1f} |")
                print(rows[-1], flush=True)
                if args.data:
                    notes.append(f"{impl}: est. {r['epoch_examples'] / r['samples_per_s'] / 60:,.1f} min per epoch "
                                 f"of {r['epoch_examples']:,} tweets (6L/{student_hidden})")
    header = ("| student | seq | implementation | KD loss | precision | vocabulary rows | ms/step (median ± half-range) "
              f"| samples/s | speed vs {args.baseline} | peak MB | memory vs {args.baseline} | first step s |")
    title = (f"KD train step, teacher 12L/768 -> students 6L, vocab {args.vocab:,} (task rows {args.kept:,}), "
             f"batch {args.batch}, attention target {args.att_target}")
    if args.data:
        title += f"; real tweets: {args.sample_batches} batches at evenly spaced positions of an epoch"
        if "xlmr_mini-cached-padded" in args.impls:
            notes += padding_notes(args)
    if not args.quick and not args.json:
        append_results(title, header, rows, "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
