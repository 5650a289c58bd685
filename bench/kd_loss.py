"""KD loss terms: PyTorch reference vs torch.compile'd reference vs fused Triton kernels.

The three TinyBERT terms at the paper's student shapes (6 layers, batch 32, 768 hidden, 12 heads of
64, T 64 and 128; attention-score KD also at T 512), forward and forward+backward, with padding
(lengths drawn from T/2 to T):

- hidden: `layer_mse` on [L, B, T, D] hidden states;
- map: `attention_map_mse` on materialized [L, B, H, T, T] score maps;
- scores / probs: `attention_score_mse` / `attention_prob_mse` from [L, B, H, T, d] queries and
  keys, without T x T maps (the references materialize them).

GB/s counts the bytes an ideal fused kernel reads and writes (inputs once, the student's gradient
written once; for forward+backward, Q and K read again and dQ, dK written), whatever the
implementation really moves, so the rates compare like for like. Peak memory is above what the
inputs already hold. The Triton rows need a CUDA device; on CPU only the two reference rows run.

    python -m bench.kd_loss              # full run, appends to bench/RESULTS.md
    python -m bench.kd_loss --quick      # small shapes, prints only (never recorded)
"""
import argparse
import time

import torch

from bench.harness import append_results, measure
from xlmr_mini.kernels.attention_kd import (attention_map_mse, attention_map_mse_reference, attention_prob_mse,
                                           attention_prob_mse_reference, attention_score_mse,
                                           attention_score_mse_reference, attention_scores)
from xlmr_mini.kernels.layer_mse import layer_mse, layer_mse_reference


def _lengths_mask(batch, seq, device, g):
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    return (torch.arange(seq)[None, :] < lengths[:, None]).to(device)  # [B, T] bool


def make_case(term, L, B, T, D, H, dtype, device, seed=0):
    """(triton fn, reference fn, student leaves, teacher constants, mask, ideal bytes fwd, bwd)."""
    g = torch.Generator().manual_seed(seed)
    mask = _lengths_mask(B, T, device, g)
    es = torch.tensor([], dtype=dtype).element_size()

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    if term == "hidden":
        s, t = rand(L, B, T, D), rand(L, B, T, D)
        n = s.numel() * es
        return layer_mse, layer_mse_reference, [s], [t], mask, 3 * n, 2 * n
    if term == "map":
        d = D // H
        key_ok = mask[None, :, None, None, :]
        maps = [torch.where(key_ok, attention_scores(rand(L, B, H, T, d), rand(L, B, H, T, d)),
                            torch.finfo(torch.float32).min).to(dtype) for _ in range(2)]
        n = maps[0].numel() * es
        return (attention_map_mse, attention_map_mse_reference, maps[:1], maps[1:],
                mask, 3 * n, 2 * n)
    d = D // H
    q_s, k_s, q_t, k_t = (rand(L, B, H, T, d) for _ in range(4))
    n = q_s.numel() * es
    fn, ref = ((attention_score_mse, attention_score_mse_reference) if term == "scores"
               else (attention_prob_mse, attention_prob_mse_reference))
    return fn, ref, [q_s, k_s], [q_t, k_t], mask, 4 * n, 6 * n


def runner(loss_fn, leaves, consts, mask, backward):
    if not backward:
        def fwd():
            with torch.no_grad():
                loss_fn(*leaves, *consts, mask)
        return fwd
    leaves = [x.detach().requires_grad_() for x in leaves]

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        loss_fn(*leaves, *consts, mask).sum().backward()
    return fwd_bwd


def map_bytes(L, B, H, T):
    """What the materialized path holds for one score map pair in fp32 (two [L, B, H, T, T])."""
    return 2 * L * B * H * T * T * 4


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.kd_loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 128], help="T for every term")
    p.add_argument("--long-seq", type=int, default=512, help="extra T for the scores/probs terms")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="input dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes, one repeat, nothing recorded")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.batch, args.seqs, args.long_seq, args.repeats = 2, 4, [64], 128, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    L, B, D, H = args.layers, args.batch, args.hidden, args.heads
    cases = [(term, T) for T in args.seqs for term in ("hidden", "map", "scores", "probs")]
    cases += [(term, args.long_seq) for term in ("scores", "probs") if args.long_seq not in args.seqs]

    rows, compile_notes = [], []
    for term, T in cases:
        fn, ref, leaves, consts, mask, bytes_fwd, bytes_bwd = make_case(term, L, B, T, D, H, dtype, device)
        impls = {"reference": ref, "compiled reference": torch.compile(ref)}
        if device.type == "cuda":
            impls["triton"] = fn
        for backward in (False, True):
            moved = bytes_fwd + (bytes_bwd if backward else 0)
            for name, loss_fn in impls.items():
                run = runner(loss_fn, leaves, consts, mask, backward)
                if name == "compiled reference":  # the first call compiles: timed apart
                    t0 = time.perf_counter()
                    run()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    compile_notes.append(f"{term} T={T} {'fwd+bwd' if backward else 'fwd'}: "
                                         f"{time.perf_counter() - t0:.1f} s")
                m = measure(name, run, items=moved / 1e9, rate_unit="GB/s", warmup=1,
                            repeats=args.repeats, device=device)
                row = (f"| {term} | {T} | {'fwd+bwd' if backward else 'fwd'} | {name} | "
                       f"{m.median_s * 1e3:,.2f} ± {m.spread_s * 1e3:,.2f} | {m.rate:,.1f} | {m.peak_mem_mb:,.0f} |")
                rows.append(row)
                print(row, flush=True)
        del leaves, consts
    header = ("| term | T | pass | implementation | ms (median ± half-range) | GB/s (ideal fused bytes) | "
              "peak mem above inputs (MB) |")
    dh = D // H
    memory = "; ".join(f"T={T}: materialized score maps {map_bytes(L, B, H, T) / 2**20:,.0f} MB vs "
                       f"flash-style extra state {3 * L * B * H * T * 4 / 2**20:,.2f} MB (probs; scores: none)"
                       for T in sorted({*args.seqs, args.long_seq}))
    notes = (f"Shapes: {L} layers, batch {B}, hidden {D}, {H} heads of {dh}, {str(dtype)[6:]} inputs, padded "
             f"(lengths T/2 to T). Analytic memory for the attention KD of Q and K: {memory}. "
             f"Compile time of the compiled reference (first call, apart): {'; '.join(compile_notes)}.")
    if device.type != "cuda":
        notes += " No CUDA device: the Triton rows need a GPU and were not run."
    if args.quick or args.no_record:
        print("\n".join([header, *rows, "", notes]))
    else:
        append_results(f"KD loss terms, {L}L/{D}/{H}h, batch {B}", header, rows, notes)


if __name__ == "__main__":
    main()
