"""The full KD train step: xlmr_mini vs the usual TinyBERT-style step written on transformers.

One step = teacher forward (no grad) + student forward/backward + TinyBERT loss + gradient
clipping + AdamW, at the paper's shapes: teacher 12L/768 (12 heads, 3072), students 6L/768 and
6L/384 (12 heads, 1536), vocabulary 250,002, batch 32 with padding (lengths T/2..T), T 64 and 128.

- transformers: both models `XLMRobertaForSequenceClassification` with eager attention and
  `output_attentions` / `output_hidden_states` (all 12 teacher layers' maps materialized), the
  loss summed in Python over the mapped layers (attention probabilities, which is what
  transformers returns; hidden states through fit_dense; embeddings; logits MSE; cross-entropy),
  `torch.optim.AdamW` as people usually create it.
- xlmr_mini: `xlmr_mini.train.train_step` set up as `train` does (teacher taps only its mapped
  layers; the fused kernels on CUDA, the PyTorch reference on CPU; fused AdamW), eager and with `--compile`'s compiled
  forward+loss. The attention target is set with --att-target (default probs, the same target
  as the transformers step).

Each implementation runs in its own process so that peak memory is its own: the peak during the
timed steps of everything the process holds (weights, optimizer state, activations) above the
process's size before the models were built. On CPU the process runs with a low
MALLOC_MMAP_THRESHOLD_, so freed tensors leave the resident set and the sampled RSS follows
live memory.

    python -m bench.kd_step                # full run, appends to bench/RESULTS.md
    python -m bench.kd_step --quick        # tiny shapes, prints only
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench.harness import append_results, measure, rss_mb

IMPLS = ("transformers", "xlmr_mini", "xlmr_mini-compiled")


def shapes(args, student_hidden):
    t = dict(layers=12, hidden=768, heads=12, inter=3072)
    s = dict(layers=6, hidden=student_hidden, heads=12, inter=4 * student_hidden)
    if args.quick:
        t, s = dict(layers=4, hidden=64, heads=4, inter=128), dict(layers=2, hidden=student_hidden // 12, heads=4,
                                                                   inter=student_hidden // 3)
    return t, s


def batch(args, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=g)
    mask = (torch.arange(args.seq)[None, :] < lengths[:, None]).long()
    ids[mask == 0] = 1
    labels = torch.randint(0, 3, (args.batch,), generator=g)
    return ids.to(device), mask.to(device), labels.to(device)


def transformers_step(args, t, s, device):
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    def model(c):
        cfg = XLMRobertaConfig(vocab_size=args.vocab, hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                               num_attention_heads=c["heads"], intermediate_size=c["inter"], num_labels=3,
                               type_vocab_size=1, layer_norm_eps=1e-5, attn_implementation="eager")
        return XLMRobertaForSequenceClassification(cfg).to(device)

    teacher, student = model(t).eval(), model(s).train()
    fit_dense = torch.nn.Linear(s["hidden"], t["hidden"]).to(device)
    params = list(student.parameters()) + list(fit_dense.parameters())
    opt = torch.optim.AdamW(params, lr=5e-5)
    divisor = t["layers"] // s["layers"]
    ids, mask, labels = batch(args, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
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

    return step


def xlmr_mini_step(args, t, s, device, compiled):
    from xlmr_mini.config import XLMRConfig
    from xlmr_mini.kd_loss import HiddenProjection, KDLossConfig
    from xlmr_mini.model import XLMRClassifier, init_weights
    from xlmr_mini.kd_step import StepContext, compile_forward_loss, linear_schedule, make_optimizer, train_step

    def model(c):
        cfg = XLMRConfig(vocab_size=args.vocab, hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                         num_attention_heads=c["heads"], intermediate_size=c["inter"], id2label=("a", "b", "c"))
        m = XLMRClassifier(cfg)
        init_weights(m, cfg.initializer_range)
        return m.to(device)

    teacher, student = model(t).eval(), model(s).train()
    proj = HiddenProjection(s["hidden"], t["hidden"], "linear").to(device)
    loss_cfg = KDLossConfig(att_target=args.att_target, impl="fused" if device.type == "cuda" else "reference")
    params = list(student.parameters()) + list(proj.parameters())
    opt = make_optimizer(params, 5e-5, 0.0)
    divisor = t["layers"] // s["layers"]
    ctx = StepContext(student=student, teacher=teacher, proj=proj, loss_cfg=loss_cfg,
                      layer_map=[(i + 1) * divisor - 1 for i in range(s["layers"])], optimizer=opt,
                      scheduler=linear_schedule(opt, 10**6), params=params, bf16=args.bf16,
                      loss_fn=compile_forward_loss() if compiled else None)
    ids, mask, labels = batch(args, device)
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return lambda: train_step(ctx, data, device)


def run_one(args):
    """In a child process: build one implementation, time it, print one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t, s = shapes(args, args.student_hidden)
    torch.manual_seed(0)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = rss_mb()
    if args.one == "transformers":
        step = transformers_step(args, t, s, device)
    else:
        step = xlmr_mini_step(args, t, s, device, compiled=args.one.endswith("compiled"))
    t0 = time.perf_counter()
    step()  # the first step apart: it includes any compilation
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    m = measure(args.one, step, items=args.batch, warmup=1, repeats=args.repeats, device=device, mem_base_mb=base)
    print(json.dumps(dict(median_s=m.median_s, spread_s=m.spread_s, rate=m.rate, peak_mb=m.peak_mem_mb, first_s=first_s)))


def spawn(args, impl, student_hidden, seq):
    cmd = [sys.executable, "-m", "bench.kd_step", "--one", impl, "--student-hidden", str(student_hidden),
           "--seq", str(seq), "--batch", str(args.batch), "--vocab", str(args.vocab), "--repeats", str(args.repeats),
           "--att-target", args.att_target] + (["--bf16"] if args.bf16 else []) + (["--quick"] if args.quick else [])
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
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--vocab", type=int, default=250002)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--att-target", default="probs", choices=("scores", "probs"))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    p.add_argument("--quick", action="store_true", help="tiny shapes, prints only")
    p.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--student-hidden", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.batch, args.seqs, args.repeats = 1000, 4, [16], 1
    if args.one:
        return run_one(args)
    rows = []
    for student_hidden in args.students:
        for seq in args.seqs:
            results = {impl: spawn(args, impl, student_hidden, seq) for impl in args.impls}
            base = results.get("transformers")
            for impl, r in results.items():
                speed = f"{r['rate'] / base['rate']:.2f}x" if base else "-"
                mem = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base else "-"
                rows.append(f"| 6L/{student_hidden} | {seq} | {impl} | {r['median_s'] * 1e3:,.0f} ± {r['spread_s'] * 1e3:,.0f} "
                            f"| {r['rate']:,.2f} | {speed} | {r['peak_mb']:,.0f} | {mem} | {r['first_s']:,.1f} |")
                print(rows[-1], flush=True)
    header = ("| student | seq | implementation | ms/step (median ± half-range) | samples/s | speed vs transformers "
              "| peak MB | memory vs transformers | first step s (incl. compile) |")
    title = (f"KD train step, teacher 12L/768 -> students 6L, vocab {args.vocab:,}, batch {args.batch}, "
             f"{'bf16 autocast' if args.bf16 else 'fp32'}, attention target {args.att_target}")
    if not args.quick:
        append_results(title, header, rows)


if __name__ == "__main__":
    main()
