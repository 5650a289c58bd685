"""Everything a CPU cannot check, on one GPU in one command; a JSON and a Markdown report.

    python -m bench.gpu_check --out gpu-check/       # on a CUDA machine (aimed at < 8 min on an H100/H200)
    python -m bench.gpu_check --out DIR --cpu-smoke  # tiny shapes, Triton's interpreter: the plumbing (CI)

Sections (each runs apart: one that fails is recorded with its error and the others still run):

1. kernel tests: `tests/test_kernels.py` under pytest (compiled kernels on CUDA; the smoke runs
   its by-hand and empty-batch tests through the interpreter).
2. fused vs reference: each fused KD-loss kernel's loss and input gradient against its reference
   at the paper's shapes (6 layers, batch 32, 12 heads of 64, hidden 768, T = 128), fp32 and bf16,
   with the errors and the self-check's tolerances (`xlmr_mini.step_impl.TOLERANCES`).
3. kernel bandwidth: the fused kernels timed at those shapes, the bytes they must move
   (`bench.roofline.kernel_work`) over the time, against the roofline estimate for A100 and H100.
4. KD step: `bench.kd_step` (each implementation in its own process) for students 6L/768 and 6L/384,
   batch 8 and 32, T 64 and 128: its transformers baseline under bf16 autocast (full vocabulary)
   against the project default (`--kd-impl auto`, `--compile auto`, `--precision auto`, the task's
   vocabulary rows); at the paper's shape (6L/768, batch 32, T 64) also the baseline on the trimmed
   vocabulary and the default reading a teacher cache, each also with activation checkpointing
   (transformers' `gradient_checkpointing_enable()`, `--recompute`); samples/s, peak memory, MFU
   (model FLOPs: 2 N per token for the teacher's forward, 6 N for the student's forward and
   backward, N the encoder layers' weights; attention matmuls left out) against the GPU's bf16 dense
   peak.
5. self-check: `python -m xlmr_mini.train` as a user runs it, on the demo data with a random
   12-layer, 768-wide teacher (the smoke: 2 layers, 64 wide) and a half-depth student for two
   steps; what its results.json says ran and the self-check's outcome.
6. study dry run: `python -m xlmr_mini.study all --dry-run --batch-size 8` on the demo data with a
   random base of xlm-roberta-base's sizes (the smoke: 2 layers, 64 wide): its step rates.

The exit status is 0 when every section passed.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# bf16 dense tensor peaks (FLOP/s) for MFU, by a part of the device name.
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
PAPER = dict(L=6, B=32, H=12, T=128, d=64, D=768)
SMOKE = dict(L=2, B=3, H=2, T=9, d=8, D=16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes through Triton's interpreter, on CPU")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (Triton reads it then)
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run it on a GPU machine, or with --cpu-smoke")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    sections = [_section(name, fn, args, device) for name, fn in SECTIONS]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python -m bench.gpu_check", *(argv if argv is not None else sys.argv[1:])]),
              "device": _environment(), "cpu_smoke": args.cpu_smoke, "ok": all(s["ok"] for s in sections),
              "sections": sections}
    from xlmr_mini.files import atomic_write

    atomic_write(args.out / "gpu_check.json", json.dumps(report, indent=1) + "\n")
    atomic_write(args.out / "gpu_check.md", markdown(report))
    print(f"gpu_check: {'all passed' if report['ok'] else 'FAILED: ' + ', '.join(s['name'] for s in sections if not s['ok'])}"
          f"; wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


def _environment() -> str:
    from bench.harness import environment

    return environment()


def _section(name: str, fn, args, device) -> dict:
    print(f"gpu_check: {name} ...", flush=True)
    started = time.perf_counter()
    try:
        ok, rows = fn(args, device)
        error = None
    except Exception as e:  # recorded; the other sections still run
        ok, rows, error = False, [], f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
    return {"name": name, "ok": ok, "seconds": round(time.perf_counter() - started, 1), "rows": rows, "error": error}


# ---------------------------------------------------------------------------------------------
# 1. The kernel tests
# ---------------------------------------------------------------------------------------------
def kernel_tests(args, device) -> tuple[bool, list[dict]]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_kernels.py")]
    if args.cpu_smoke:
        cmd += ["-k", "by_hand or empty_batch"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode == 0, [{"command": " ".join(cmd[1:]), "exit": proc.returncode,
                                   "summary": lines[-1] if lines else proc.stderr[-500:]}]


# ---------------------------------------------------------------------------------------------
# 2. Fused vs reference, and 3. the kernels' bandwidth
# ---------------------------------------------------------------------------------------------
def _inputs(shape: dict, dtype, device, seed: int = 0) -> dict:
    L, B, H, T, d, D = (shape[k] for k in "LBHTdD")
    g = torch.Generator(device=device).manual_seed(seed)
    lengths = torch.linspace(T // 2, T, B, device=device).round()
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).to(torch.int32)

    def randn(*size):
        return torch.randn(*size, generator=g, device=device).to(dtype)

    return {"hidden": (randn(L, B, T, D), randn(L, B, T, D)),
            "qk": tuple(randn(L, B, H, T, d) for _ in range(4)), "mask": mask}


def _kernels():
    from xlmr_mini.kernels import (attention_prob_mse, attention_prob_mse_reference, attention_score_mse,
                                   attention_score_mse_reference, layer_mse, layer_mse_reference)

    return {"layer MSE": (layer_mse, layer_mse_reference, "hidden"),
            "attention probs MSE": (attention_prob_mse, attention_prob_mse_reference, "qk"),
            "attention scores MSE": (attention_score_mse, attention_score_mse_reference, "qk")}


def _loss_and_grad(fn, tensors, mask, grad_out):
    """The loss [L] and the student's input gradients as one vector (the first half of `tensors`
    is the student's: hidden states, or Q and K; the teacher gets none)."""
    inputs = [x.detach().requires_grad_(i < len(tensors) // 2) for i, x in enumerate(tensors)]
    loss = fn(*inputs, mask)
    grads = torch.autograd.grad(loss, inputs[:len(tensors) // 2], grad_out)
    return loss.detach().float(), torch.cat([g.float().reshape(-1) for g in grads])


def fused_vs_reference(args, device) -> tuple[bool, list[dict]]:
    from xlmr_mini.step_impl import TOLERANCES

    shape = SMOKE if args.cpu_smoke else PAPER
    rows, ok = [], True
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        atol, rtol = TOLERANCES[precision]
        data = _inputs(shape, dtype, device)
        for name, (fused, reference, kind) in _kernels().items():
            grad_out = torch.linspace(0.5, 1.5, shape["L"], device=device)  # not all ones: scaling is tested too
            loss_f, grad_f = _loss_and_grad(fused, data[kind], data["mask"], grad_out)
            loss_r, grad_r = _loss_and_grad(reference, data[kind], data["mask"], grad_out)
            scale = grad_r.abs().max().clamp(min=1e-30)
            loss_err = (loss_f - loss_r).abs().max().item()
            grad_err = ((grad_f - grad_r).abs() / scale).max().item()
            passed = bool((loss_f - loss_r).abs().le(atol + rtol * loss_r.abs()).all()) and bool(
                ((grad_f - grad_r).abs() / scale).le(atol + rtol * grad_r.abs() / scale).all())
            ok &= passed
            rows.append({"kernel": name, "precision": precision, "shape": shape, "loss_max_abs_error": loss_err,
                         "grad_max_error_rel_to_largest": grad_err, "atol": atol, "rtol": rtol, "ok": passed})
    return ok, rows


def _timed(fn, device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def kernel_bandwidth(args, device) -> tuple[bool, list[dict]]:
    from bench.roofline import GPUS, estimate_us, kernel_work
    from xlmr_mini.kernels import attention_prob_mse, layer_mse

    shape = SMOKE if args.cpu_smoke else PAPER
    repeats = 1 if args.cpu_smoke else 20
    rows = []
    for precision, dtype, nbytes in (("bf16", torch.bfloat16, 2), ("fp32", torch.float32, 4)):
        data = _inputs(shape, dtype, device)
        h_s, h_t = data["hidden"]
        q_s, k_s, q_t, k_t = (x.requires_grad_(i < 2) for i, x in enumerate(data["qk"]))
        work = {w.kernel: w for w in kernel_work(shape["T"], nbytes, shape["L"], shape["B"], shape["H"], shape["d"],
                                                  shape["D"])}
        loss = attention_prob_mse(q_s, k_s, q_t, k_t, data["mask"])
        ones = torch.ones_like(loss)
        timed = {"layer MSE fwd": (lambda: layer_mse(h_s, h_t, data["mask"]), ["layer MSE fwd"]),
                 "score MSE (probs) fwd": (lambda: attention_prob_mse(q_s, k_s, q_t, k_t, data["mask"]),
                                           ["score MSE (probs) fwd"]),
                 "score MSE (probs) fwd + dQ + dK": (
                     lambda: torch.autograd.grad(attention_prob_mse(q_s, k_s, q_t, k_t, data["mask"]), (q_s, k_s),
                                                 ones),
                     ["score MSE (probs) fwd", "score MSE (probs) dQ", "score MSE (probs) dK"])}
        for name, (fn, launches) in timed.items():
            seconds = _timed(fn, device, repeats)
            moved = sum(work[k].hbm_bytes for k in launches)
            row = {"kernels": name, "precision": precision, "T": shape["T"], "measured_us": seconds * 1e6,
                   "achieved_GB_s": moved / seconds / 1e9}
            for gpu in GPUS:
                row[f"{gpu.name}_estimate_us"] = sum(estimate_us(work[k], gpu, precision)[2] for k in launches)
            rows.append(row)
    return True, rows


# ---------------------------------------------------------------------------------------------
# 4. The KD step
# ---------------------------------------------------------------------------------------------
def _encoder_weights(layers: int, hidden: int, inter: int) -> int:
    return layers * (4 * hidden * hidden + 2 * hidden * inter)


def model_flops(student_hidden: int, batch: int, seq: int, t: dict, s: dict) -> float:
    tokens = batch * seq
    return tokens * (2 * _encoder_weights(t["layers"], t["hidden"], t["inter"])
                     + 6 * _encoder_weights(s["layers"], s["hidden"], s["inter"]))


def bf16_peak(device_name: str) -> float | None:
    return next((peak for part, peak in BF16_PEAKS.items() if part in device_name), None)


def kd_step(args, device) -> tuple[bool, list[dict]]:
    from bench import kd_step as bench_step

    quick = args.cpu_smoke
    configs = [(h, b, t) for h in (768, 384) for b in (8, 32) for t in (64, 128)]
    if quick:
        configs = [(384, 4, 16)]
    rows, ok = [], True
    for student_hidden, batch, seq in configs:
        ns = argparse.Namespace(batch=batch, vocab=1000 if quick else 250002, repeats=1 if quick else 5,
                                att_target="probs", kept=300 if quick else bench_step.TSM_KEPT, sample_batches=4,
                                quick=quick, data=None, tokenizer=None, student_hidden=student_hidden, seq=seq,
                                run_steps=6900, pad_sizes=bench_step.PAD_SIZES)
        t, s = bench_step.shapes(ns, student_hidden)
        impls = ["transformers-bf16", "xlmr_mini"]
        if quick or (student_hidden, batch, seq) == (768, 32, 64):  # the paper's shape: the tuned baseline, the
            # cache, and activation checkpointing on both sides
            impls += ["transformers-bf16-trimmed", "xlmr_mini-cached", "transformers-bf16-trimmed-recompute",
                      "xlmr_mini-cached-recompute"]
        for impl in impls:
            r = bench_step.spawn(ns, impl, student_hidden, seq)
            peak = bf16_peak(r["device"])
            flops = model_flops(student_hidden, batch, seq, t, s) * r["samples_per_s"] / batch
            rows.append({**r, "model_TFLOP_s": flops / 1e12, "mfu": flops / peak if peak else None})
        ok &= rows[-1]["samples_per_s"] > 0
    return ok, rows


# ---------------------------------------------------------------------------------------------
# 5. The self-check as a user's run, and 6. the study's dry run
# ---------------------------------------------------------------------------------------------
def _random_model(out: Path, cache: Path, layers: int, hidden: int, heads: int) -> Path:
    """A random model on the demo's vocabulary and labels (a teacher or a base of these sizes)."""
    from xlmr_mini.checkpoint import save_hf
    from xlmr_mini.copy_weights import scratch_state_dict
    from xlmr_mini.data import build_demo
    from xlmr_mini.demo_models import demo_architecture

    task = build_demo(cache)
    cfg = demo_architecture(task).replace(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                          intermediate_size=4 * hidden)
    save_hf(out, cfg, scratch_state_dict(cfg, 0), task.tokenizer_path)
    return out


def _sizes(args) -> tuple[int, int, int]:
    return (2, 64, 4) if args.cpu_smoke else (12, 768, 12)


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} exited {proc.returncode}: {proc.stderr.strip()[-1000:]}")
    return proc


def self_check(args, device) -> tuple[bool, list[dict]]:
    work = args.out / "self-check"
    teacher = _random_model(work / "teacher", work / "cache", *_sizes(args))
    run = work / "run"
    _run(["xlmr_mini.train", "--init", "from-teacher", "--teacher", str(teacher), "--max-steps", "2",
          "--batch-size", "8", "--max-length", "64", "--cache-dir", str(work / "cache"), "--out", str(run),
          "--overwrite", "--device", device.type])
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    row = {k: results.get(k) for k in ("kd_impl", "compile", "step_check", "precision")}
    expected = "fused" if device.type == "cuda" else "reference"  # what auto picks where the check passes
    return results["kd_impl"]["used"] == expected, [row]


def study_dry_run(args, device) -> tuple[bool, list[dict]]:
    work = args.out / "study"
    base = _random_model(work / "base", work / "cache", *_sizes(args))
    proc = _run(["xlmr_mini.study", "all", "--data", "demo", "--base", str(base), "--dry-run", "--batch-size", "8",
                 "--cache-dir", str(work / "cache"), "--out", str(work / "runs")])
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return True, [{"output_tail": lines[-12:]}]


SECTIONS = [("kernel tests", kernel_tests), ("fused vs reference", fused_vs_reference),
            ("kernel bandwidth", kernel_bandwidth), ("KD step", kd_step), ("self-check", self_check),
            ("study dry run", study_dry_run)]


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    out = [f"# GPU check: {'all passed' if report['ok'] else 'FAILED'}", "",
           f"- date: {report['date']}", f"- device: {report['device']}", f"- command: `{report['command']}`"]
    for s in report["sections"]:
        out += ["", f"## {s['name']}: {'passed' if s['ok'] else 'FAILED'} ({s['seconds']} s)", ""]
        if s["error"]:
            out += ["```", s["error"].strip(), "```"]
        if s["rows"]:
            keys = list(dict.fromkeys(k for row in s["rows"] for k in row))
            out += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            out += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in s["rows"]]
    return "\n".join(out) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value).replace("|", "/")
    return "" if value is None else str(value).replace("|", "/")


if __name__ == "__main__":
    raise SystemExit(main())
