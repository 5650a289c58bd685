"""Roofline ESTIMATE of the KD-loss kernels on A100 and H100 at the paper's shapes: no GPU run.

For each kernel launch: the bytes an ideal kernel moves through HBM (each input read once, each
output written once; re-reads of key tiles are assumed to hit L2), the FLOPs of its dots and an
approximate count of its other arithmetic, and the time each would take at the GPU's peak. The
estimate is the slowest of the three (perfect overlap), except that IEEE fp32 dots run on the same
FMA units as the other arithmetic, so there the two add up. Peaks (dense, vendor datasheets):

    A100-SXM 80GB: 2.0 TB/s HBM; 312 TFLOP/s bf16 tensor, 156 TF32 tensor, 19.5 fp32 non-tensor
    H100-SXM:      3.35 TB/s HBM; 989 TFLOP/s bf16 tensor, 494 TF32 tensor, 67 fp32 non-tensor

Called by `python -m bench.kernels_aot --roofline`.
"""
from dataclasses import dataclass

from bench.harness import append_results


@dataclass(frozen=True)
class GPU:
    name: str
    hbm_bytes_s: float
    bf16_tensor: float
    tf32_tensor: float
    fp32: float  # non-tensor (FMA) FLOP/s


GPUS = [GPU("A100", 2.0e12, 312e12, 156e12, 19.5e12), GPU("H100", 3.35e12, 989e12, 494e12, 67e12)]

# Other arithmetic per element (hidden state, map entry, or score-tile entry), counted from the
# kernels' code; exp and max count as one each. Approximate: it sets the estimate only where it is
# the limit.
OTHER_PER_ENTRY = {"layer MSE fwd": 4, "attention-map MSE fwd": 4, "scores fwd": 6,
                   "probs fwd": 22, "scores bwd": 5, "probs bwd": 12}


@dataclass(frozen=True)
class Work:
    kernel: str
    hbm_bytes: float
    dot_flops: float
    other_flops: float


def kernel_work(T: int, dtype_bytes: int, L=6, B=32, H=12, d=64, D=768) -> list[Work]:
    """Bytes and FLOPs of each kernel launch for L layer pairs of one batch (student = teacher
    head dim d; the mask and per-program partial sums are negligible and left out)."""
    hidden, entries, rows = L * B * T * D, L * B * H * T * T, L * B * H * T
    qk = 4 * rows * d * dtype_bytes  # Q and K of student and teacher
    stats = 3 * rows * 4  # fp32 log-sum-exp of both sides and delta, for probabilities
    per_dot = 2 * entries * d  # one T x T x d product per (layer, sequence, head)
    out = [Work("layer MSE fwd", 3 * hidden * dtype_bytes, 0,
                OTHER_PER_ENTRY["layer MSE fwd"] * hidden),
           Work("attention-map MSE fwd", 3 * entries * dtype_bytes, 0,
                OTHER_PER_ENTRY["attention-map MSE fwd"] * entries)]
    for target, probs in (("scores", False), ("probs", True)):
        out.append(Work(f"score MSE ({target}) fwd", qk + probs * stats, (2 + 2 * probs) * per_dot,
                        OTHER_PER_ENTRY[f"{target} fwd"] * entries))
        for grad in ("dQ", "dK"):  # re-computes both score tiles, then dS @ (K or Q)
            out.append(Work(f"score MSE ({target}) {grad}", qk + rows * d * dtype_bytes
                            + probs * stats, 3 * per_dot, OTHER_PER_ENTRY[f"{target} bwd"] * entries))
    return out


def estimate_us(w: Work, gpu: GPU, dtype: str) -> tuple[float, float, float]:
    """(HBM time, compute time, estimate) in microseconds."""
    hbm = w.hbm_bytes / gpu.hbm_bytes_s
    if dtype == "fp32":  # IEEE dots: FMA units, shared with the other arithmetic
        compute = (w.dot_flops + w.other_flops) / gpu.fp32
    else:
        compute = max(w.dot_flops / gpu.bf16_tensor, w.other_flops / gpu.fp32)
    return hbm * 1e6, compute * 1e6, max(hbm, compute) * 1e6


def rows(seqs=(64, 128)) -> list[str]:
    out = []
    for T in seqs:
        for dtype, nbytes in (("bf16", 2), ("fp32", 4)):
            for w in kernel_work(T, nbytes):
                cells = [w.kernel, T, dtype, f"{w.hbm_bytes / 1e6:,.1f}", f"{w.dot_flops / 1e9:,.2f}",
                         f"{w.other_flops / 1e9:,.2f}"]
                for gpu in GPUS:
                    hbm, compute, est = estimate_us(w, gpu, dtype)
                    bound = "memory" if hbm >= compute else "compute"
                    cells += [f"{hbm:,.1f}", f"{compute:,.1f}", f"{est:,.1f} ({bound})"]
                cells.append("not yet measured: no GPU was available")
                out.append("| " + " | ".join(map(str, cells)) + " |")
    return out


HEADER = ("| kernel launch | T | dtype | HBM MB | dot GFLOP | other GFLOP | A100 HBM µs | "
          "A100 compute µs | A100 estimate µs | H100 HBM µs | H100 compute µs | H100 estimate µs "
          "| measured |")

NOTES = ("ESTIMATE, not a measurement: no GPU was available. Shapes: 6 student layers matched to "
         "teacher layers 2, 4, ..., 12, batch 32, 12 heads of 64 (student and teacher), hidden "
         "768. Peaks used: A100-SXM 80GB 2.0 TB/s, 312 TFLOP/s bf16 tensor, 156 TF32, 19.5 fp32 "
         "non-tensor; H100-SXM 3.35 TB/s, 989 bf16 dense, 494 TF32, 67 fp32 non-tensor. fp32 "
         "rows use IEEE dots on the FMA units (the kernels' fp32 path: TF32 would cost ~1e-3 "
         "relative error), so their dots run at the fp32 non-tensor peak; bf16 dots at the "
         "tensor peak, overlapped with the other arithmetic. Bytes: each input read once, each "
         "output written once. The 'measured' column is for GPU runs of bench/kd_loss.py.")


def main(record: bool = False):
    if record:
        append_results("Roofline estimate of the KD-loss kernels, A100 / H100 (no GPU run)",
                       HEADER, rows(), NOTES)
    else:
        print("\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1), *rows(), "", NOTES]))
