"""Every launch config of the Triton kernels compiles for A100 (sm_80) and H100 (sm_90), fits
their shared memory, and spills no registers (or no more than the bound its launcher states).

No GPU needed: `python -m bench.kernels_aot` compiles what the launchers would launch and reads
the cubins with the Triton wheel's cuobjdump. It runs in a subprocess because the kernels must be
real `triton.jit` kernels, not the interpreter's (conftest.py sets TRITON_INTERPRET=1 on machines
without CUDA, and Triton reads it when the kernels are defined). The "ci" shape set is the paper's
shapes (6 layers, batch 32, T 64 and 128, 12 heads of 64, hidden 768) and one small student (T 16,
12 heads of 32); compiled kernels are cached within the run, and by Triton across runs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = [("layer MSE", "fwd"), ("attention-map MSE", "fwd")] + [
    (f"score MSE ({target})", variant) for target in ("scores", "probs")
    for variant in ("fwd", "dQ", "dK")]


def _why_no_nvidia_backend() -> str:
    """Empty if the installed Triton can compile for NVIDIA GPUs, else the reason it cannot."""
    try:
        from triton.backends import backends
    except ImportError:
        return "Triton is not installed, so it has no NVIDIA backend to compile the kernels with"
    if "nvidia" not in backends:
        return f"the installed Triton has no NVIDIA backend (backends: {sorted(backends)})"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_no_nvidia_backend()),
                                reason=_why_no_nvidia_backend() or "unused")


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "bench.kernels_aot", "--shapes", "ci", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def _failures(rows, bad) -> str:
    return "\n".join(f"{r['shape']} {r['kernel']} {r['variant']} {r['dtype']} {r['arch']}: "
                     f"{bad(r)}" for r in rows if bad(r))


def test_every_kernel_is_compiled_for_both_targets_at_the_paper_shapes(rows):
    got = {(r["kernel"], r["variant"], r["dtype"], r["arch"]) for r in rows if r["paper"]}
    want = {(k, v, dt, arch) for k, v in KERNELS for dt in ("fp32", "bf16")
            for arch in ("sm_80", "sm_90")}
    assert got == want, (sorted(want - got), sorted(got - want))
    assert {r["shape"] for r in rows if not r["paper"]}, "the small shape is missing"


def test_every_config_compiles(rows):
    assert not _failures(rows, lambda r: r["error"])


def test_shared_memory_fits_and_a_block_can_be_resident(rows):
    def bad(r):
        if r["shared"] > r["shared_limit"]:
            return f"{r['shared']} B of shared memory > {r['shared_limit']} B"
        return "" if r["blocks_per_sm"] >= 1 else "no block fits on an SM"
    assert not _failures(rows, bad)


def test_no_register_spills_beyond_the_stated_bound(rows):
    def bad(r):
        bound = 0 if r["paper"] else r["max_stack_bytes"]  # the paper's shapes: none at all
        return f"{r['stack']} B of stack > {bound} B ({r['why'] or 'no bound stated'})" \
            if r["stack"] > bound else ""
    assert not _failures(rows, bad)
