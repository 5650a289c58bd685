"""Where a KD step's time goes: torch.profiler over steps of each of `bench.kd_step`'s
implementations (built as it builds them, all in this process), the operators with the most
self time side by side, in ms per step and as a share of the step.

    python -m bench.profile_step                                   # trimmed transformers bf16 vs xlmr_mini
    python -m bench.profile_step --impls xlmr_mini xlmr_mini-cached --top 15 --no-record

Writes one section to bench/RESULTS.md (`--no-record`: print only).
"""
import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from bench.harness import append_results
from bench.kd_step import IMPLS, TSM_KEPT, build, shapes


def self_times(step, steps: int, device) -> tuple[dict[str, float], float]:
    """({operator: self ms per step}, total self ms per step) over `steps` profiled steps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    per_op = collections.Counter()
    for event in prof.key_averages():
        self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        per_op[event.key] += self_us / 1e3 / steps
    return dict(per_op), sum(per_op.values())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", nargs="+", default=["transformers-bf16-trimmed", "xlmr_mini"], choices=IMPLS)
    p.add_argument("--student-hidden", type=int, default=768)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="profiled steps per implementation, after one warm-up step")
    p.add_argument("--top", type=int, default=12, help="operators listed: the union of each implementation's top")
    p.add_argument("--run-steps", type=int, default=6900, help="as bench.kd_step: the run --compile auto decides for")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args(argv)
    args = argparse.Namespace(batch=a.batch, seq=a.seq, vocab=250002, kept=TSM_KEPT, att_target="probs", data=None,
                              quick=False, student_hidden=a.student_hidden, run_steps=a.run_steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t, s = shapes(args, a.student_hidden)
    profiles = {}
    for impl in a.impls:
        torch.manual_seed(0)
        step = build(args, impl, t, s, device)[0]
        step()  # warm-up (and any compilation)
        profiles[impl] = self_times(step, a.steps, device)
        del step
    ops = []
    for per_op, _ in profiles.values():
        for op, _ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:a.top]:
            if op not in ops:
                ops.append(op)
    ops.sort(key=lambda op: -max(per_op.get(op, 0.0) for per_op, _ in profiles.values()))
    header = "| operator | " + " | ".join(f"{impl} ms/step (share)" for impl in a.impls) + " |"
    cell = lambda ms, total: f"{ms:,.0f} ({ms / total:.0%})" if ms else "-"  # noqa: E731
    rows = [f"| `{op}` | " + " | ".join(cell(per_op.get(op, 0.0), total) for per_op, total in profiles.values()) + " |"
            for op in ops]
    rows.append("| all operators (self time) | " + " | ".join(f"{total:,.0f}" for _, total in profiles.values()) + " |")
    title = (f"KD step profile: teacher 12L/768 -> student 6L/{a.student_hidden}, batch {a.batch}, seq {a.seq}, "
             f"task vocabulary {TSM_KEPT:,} rows")
    notes = (f"Self time per operator (torch.profiler, {a.steps} steps after a warm-up, one process). Operators a "
             f"compiled graph runs appear as the graph's own entries.")
    if a.no_record:
        print(header, *rows, sep="\n")
    else:
        append_results(title, header, rows, notes)


if __name__ == "__main__":
    main()
