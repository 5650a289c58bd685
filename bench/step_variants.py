"""A/B timings of the project's KD step (teacher 12L/768 -> student 6L/768, task vocabulary,
--precision auto) for the profile's remaining candidates; each pair is timed in turns in one
process, so both sides see the same machine load.

    python -m bench.step_variants grad-buffers   # gradients freed after each step (ours) vs kept and zero-filled
    python -m bench.step_variants threads        # 1 thread vs torch's default
    python -m bench.step_variants dropout        # CPU dropout: hashed masks (ours) vs torch's generator
    python -m bench.step_variants dropout --compiled   # the same, both compiled (a guard recompiles per variant)

Writes one section to bench/RESULTS.md (`--no-record`: print only).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.harness import append_results
from bench.kd_step import TSM_KEPT, xlmr_mini_step

TEACHER = dict(layers=12, hidden=768, heads=12, inter=3072)
STUDENT = dict(layers=6, hidden=768, heads=12, inter=3072)


class _KeepGradients:
    """While active, optimizer.zero_grad keeps and zero-fills the gradient buffers."""

    active = False
    original = torch.optim.Optimizer.zero_grad

    @classmethod
    def install(cls):
        def zero_grad(self, set_to_none=True):
            return cls.original(self, set_to_none=set_to_none and not cls.active)

        torch.optim.Optimizer.zero_grad = zero_grad


class _TorchDropout:
    """While active, the model's dropout draws torch's masks (`F.dropout`) instead of hashed ones;
    compiled, dynamo guards on the flag and keeps a graph per variant."""

    active = False

    @classmethod
    def install(cls):
        from xlmr_mini import model

        hashed = model.dropout

        def dropout(x, p, training):
            return F.dropout(x, p, training) if _TorchDropout.active else hashed(x, p, training)

        model.dropout = dropout


def _variants(kind: str, args, compiled: bool = False):
    """{name: (step, before-each-call)}: one build per variant where state differs."""
    device = torch.device("cpu")
    build = lambda: xlmr_mini_step(args, TEACHER, STUDENT, device, "auto", True, compiled, "reference")[0]  # noqa: E731
    if kind == "grad-buffers":
        _KeepGradients.install()
        steps = {name: build() for name in ("freed (ours)", "kept, zero-filled")}
        return {name: (step, lambda on=name.startswith("kept"): setattr(_KeepGradients, "active", on))
                for name, step in steps.items()}
    if kind == "dropout":
        _TorchDropout.install()
        step = build()
        return {"hashed masks (ours)": (step, lambda: setattr(_TorchDropout, "active", False)),
                "torch's generator": (step, lambda: setattr(_TorchDropout, "active", True))}
    default = torch.get_num_threads()
    step = build()
    return {f"{default} threads (default)": (step, lambda: torch.set_num_threads(default)),
            "1 thread": (step, lambda: torch.set_num_threads(1))}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.step_variants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("grad-buffers", "threads", "dropout"))
    p.add_argument("--compiled", action="store_true", help="time the compiled step (--compile on)")
    p.add_argument("--rounds", type=int, default=4, help="timed steps per variant, after one warm-up round")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args(argv)
    args = argparse.Namespace(batch=32, seq=64, vocab=250002, kept=TSM_KEPT, att_target="probs", data=None,
                              quick=False, run_steps=0)
    variants = _variants(a.kind, args, a.compiled)
    times = {name: [] for name in variants}
    for r in range(a.rounds + 1):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            step, prepare = variants[name]
            prepare()
            t0 = time.perf_counter()
            step()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    first = statistics.median(next(iter(times.values())))
    rows = [f"| {name} | {statistics.median(t):.3f} | {(max(t) - min(t)) / 2:.3f} | {first / statistics.median(t):.2f}x |"
            for name, t in times.items()]
    header = "| variant | s/step (median) | ± half-range | speed vs first row |"
    title = (f"KD step variants ({a.kind}{', compiled' if a.compiled else ''}): 12L/768 -> 6L/768, batch 32, seq 64, "
             f"task vocabulary {TSM_KEPT:,} rows")
    if a.no_record:
        print(header), print(*rows, sep="\n")
    else:
        append_results(title, header, rows, notes="Timed in turns in one process, after one warm-up round.")


if __name__ == "__main__":
    main()
