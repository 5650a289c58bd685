"""Ahead-of-time compile report for the Triton KD-loss kernels: registers, spills, shared memory.

No GPU is needed: Triton compiles a kernel for any target, and `cuobjdump` (shipped in the Triton
wheel) reads the resulting cubin. For every kernel, variant (scores / probs; forward, dQ and dK
backward) and dtype (fp32, bf16), the launchers run on meta tensors with `record_launches` on, so
the report compiles exactly what they would launch (their own config functions, their own
arguments, Triton's own specialization of those arguments) for sm_80 (A100) and sm_90 (H100).

Per row: registers per thread; stack bytes per thread (local memory: non-zero means register
spills); shared memory per block (Triton's dynamic shared memory); warps and pipeline stages; and
the blocks per SM that registers, shared memory and threads allow on that architecture. These
numbers depend on Triton's and ptxas's versions, not on the host that compiles.

    python -m bench.kernels_aot                    # all representative shapes, table
    python -m bench.kernels_aot --shapes paper     # the paper's shapes only
    python -m bench.kernels_aot --json             # one JSON object per row, for machines
    python -m bench.kernels_aot --roofline         # roofline estimate at the paper's shapes
    python -m bench.kernels_aot --record           # also append the table to bench/RESULTS.md
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

# Compiling needs real `triton.jit` kernels, not the interpreter's stand-ins; Triton reads this
# switch when the kernel modules are imported, so clear it before they are.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from bench.harness import append_results, cpu_model  # noqa: E402
from xlmr_mini.kernels import _dispatch  # noqa: E402

# The modules, not the same-named functions `xlmr_mini.kernels` exports.
layer_mse = importlib.import_module("xlmr_mini.kernels.layer_mse")
attention_kd = importlib.import_module("xlmr_mini.kernels.attention_kd")

ARCHS = (80, 90)


@dataclass(frozen=True)
class Arch:
    """Per-SM limits from NVIDIA's CUDA C++ Programming Guide (compute capabilities 8.0, 9.0)."""

    name: str
    smem_per_sm: int  # bytes usable by blocks
    smem_per_block: int  # opt-in maximum for one block
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024  # the driver's reservation for each resident block


LIMITS = {80: Arch("sm_80", 164 * 1024, 163 * 1024), 90: Arch("sm_90", 228 * 1024, 227 * 1024)}


@dataclass(frozen=True)
class Shape:
    """One KD setting: L layer pairs, batch B, T tokens, student width D with H heads of d_s, and
    teacher heads of d_t."""

    name: str
    L: int = 6
    B: int = 32
    T: int = 64
    D: int = 768
    H: int = 12
    d_t: int = 64

    @property
    def d_s(self) -> int:
        return self.D // self.H


def _shapes(T_values, widths, tag=""):
    return [Shape(f"{tag}T{T} D{D}/{H}h", T=T, D=D, H=H) for T in T_values for D, H in widths]


PAPER = _shapes((64, 128), [(768, 12)], "paper ")
SHAPE_SETS = {
    "paper": PAPER,
    # The CI test: the paper's shapes and one small student (T 16, 12 heads of 32).
    "ci": PAPER + _shapes((16,), [(384, 12)]),
    "all": PAPER + _shapes((16, 32, 64, 128), [(384, 12), (1024, 16)])
    + _shapes((16, 32), [(768, 12)]),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# What the launchers launch, recorded on meta tensors
# ---------------------------------------------------------------------------------------------
def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def recorded_launches(shape: Shape, dtype: torch.dtype):
    """[(kernel label, variant, Launch)] for every kernel the launchers start at `shape`."""
    L, B, H, T, D = shape.L, shape.B, shape.H, shape.T, shape.D
    mask = _meta(B, T, dtype=torch.bool)
    hidden = [_meta(L, B, T, D, dtype=dtype) for _ in range(2)]
    maps = [_meta(L, B, H, T, T, dtype=dtype) for _ in range(2)]
    qk = [_meta(L, B, H, T, d, dtype=dtype) for d in (shape.d_s, shape.d_s, shape.d_t, shape.d_t)]
    with _dispatch.record_launches() as rec:
        layer_mse._layer_mse_fwd_impl(*hidden, mask)
        attention_kd._attention_map_mse_fwd_impl(*maps, mask)
        labels = [("layer MSE", "fwd"), ("attention-map MSE", "fwd")]
        for target, probs in (("scores", False), ("probs", True)):
            _, *stats = attention_kd._attention_score_mse_fwd_impl(*qk, mask, probs)
            attention_kd._attention_score_mse_bwd_impl(*qk, mask, _meta(L), *stats, probs)
            labels += [(f"score MSE ({target})", v) for v in ("fwd", "dQ", "dK")]
    assert len(rec) == len(labels), "a launcher started more or fewer kernels than labelled"
    return [(kernel, variant, launch) for (kernel, variant), launch in zip(labels, rec)]


# ---------------------------------------------------------------------------------------------
# Compiling one launch for one architecture, and reading its resources
# ---------------------------------------------------------------------------------------------
@dataclass
class Resources:
    regs: int
    stack: int  # local-memory bytes per thread: spills
    shared: int  # bytes per block
    error: str = ""


_compiled: dict = {}  # (kernel, specialization, options, arch) -> Resources, for this process


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread, from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return int(usage.group(1)), int(usage.group(2))


def _specialize(launch, target):
    """Triton's own (signature, constexprs, attrs, options) for these arguments on `target`."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, config = launch.kernel, launch.config
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(config.constexprs, num_warps=config.num_warps, num_stages=config.num_stages)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, opts, bound, spec, opts)
    return signature, constexprs, attrs, options


def compile_launch(launch, arch: int) -> Resources:
    """Compile `launch` for sm_`arch` (cached per process) and read registers, stack, shared."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = _specialize(launch, target)
    key = (launch.kernel.fn.__qualname__, repr(signature), repr(sorted(constexprs.items())),
           repr(attrs), repr(options), arch)
    if key not in _compiled:
        try:
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                      target=target, options=options.__dict__)
            regs, stack = _cubin_usage(compiled.asm["cubin"])
            _compiled[key] = Resources(regs, stack, compiled.metadata.shared)
        except Exception as e:  # reported per row: one kernel failing must not hide the others
            _compiled[key] = Resources(0, 0, 0, f"{type(e).__name__}: {str(e)[:300]}")
    return _compiled[key]


def blocks_per_sm(arch: int, res: Resources, num_warps: int) -> int:
    """Resident blocks per SM allowed by registers, shared memory, threads and the block limit."""
    lim = LIMITS[arch]
    regs_per_warp = -(-max(res.regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = (lim.regs_per_sm // regs_per_warp) // num_warps
    by_smem = lim.smem_per_sm // (res.shared + lim.smem_reserved_per_block)
    by_threads = lim.threads_per_sm // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, lim.blocks_per_sm)


def report_rows(shapes, dtypes=tuple(DTYPES), archs=ARCHS):
    """One dict per (shape, dtype, kernel, variant, arch)."""
    rows = []
    for shape in shapes:
        for dt in dtypes:
            for kernel, variant, launch in recorded_launches(shape, DTYPES[dt]):
                for arch in archs:
                    res = compile_launch(launch, arch)
                    cfg = launch.config
                    rows.append(dict(
                        shape=shape.name, paper=shape in PAPER, kernel=kernel, variant=variant,
                        dtype=dt, arch=LIMITS[arch].name, **asdict(res), warps=cfg.num_warps,
                        stages=cfg.num_stages, blocks_per_sm=blocks_per_sm(arch, res, cfg.num_warps),
                        shared_limit=LIMITS[arch].smem_per_block,
                        max_stack_bytes=cfg.max_stack_bytes, why=cfg.why,
                        constexprs={k: v for k, v in cfg.constexprs.items() if k.startswith("BLOCK")}))
    return rows


def _arch_cells(r) -> list:
    if r["error"]:
        return [r["error"], "", "", ""]
    return [r["regs"], f"{r['stack']:,}", f"{r['shared']:,}", r["blocks_per_sm"]]


def table(rows) -> tuple[str, list[str]]:
    """Markdown: one line per (shape, kernel, variant, dtype), the architectures side by side."""
    per_arch = " | ".join(f"{a.name} regs | {a.name} stack B | {a.name} shared B | {a.name} blocks/SM"
                          for a in LIMITS.values())
    header = f"| shape | kernel | variant | dtype | warps | stages | tiles | {per_arch} |"
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["shape"], r["kernel"], r["variant"], r["dtype"]), []).append(r)
    lines = []
    for key, rs in groups.items():
        tiles = " ".join(f"{k[6:]}={v}" for k, v in rs[0]["constexprs"].items())
        cells = [*key, rs[0]["warps"], rs[0]["stages"], tiles]
        cells += [c for r in rs for c in _arch_cells(r)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return header, lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.kernels_aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="all")
    p.add_argument("--json", action="store_true", help="print one JSON object per row")
    p.add_argument("--roofline", action="store_true",
                   help="print the roofline estimate at the paper's shapes instead")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.roofline:
        from bench.roofline import main as roofline_main

        return roofline_main(record=args.record)
    rows = report_rows(SHAPE_SETS[args.shapes])
    if args.json:
        print("\n".join(json.dumps(r) for r in rows))
        return
    header, lines = table(rows)
    if args.record:
        import triton

        title = (f"Triton kernels compiled ahead of time for sm_80 / sm_90 ({args.shapes} shapes), "
                 f"Triton {triton.__version__}")
        device = f"AOT compile for sm_80 / sm_90, no GPU (on CPU: {cpu_model()})"
        append_results(title, header, lines, notes=NOTES, device=device)
    else:
        print("\n".join([header, "|" + "---|" * (header.count("|") - 1), *lines]))
    failed = [r for r in rows if r["error"] or r["stack"] > r["max_stack_bytes"]
              or r["shared"] > r["shared_limit"]]
    sys.exit(1 if failed else 0)


NOTES = ("Compiled with no GPU: resources are what ptxas (from the Triton wheel) assigned, read "
         "from the cubin with cuobjdump -res-usage; they depend on the Triton/ptxas versions, not "
         "on the host. Stack > 0 is local memory, i.e. register spills. Blocks/SM: the minimum "
         "over registers (65,536 per SM, allocated per warp in units of 256), shared memory "
         "(sm_80 164 KB, sm_90 228 KB per SM, 1 KB reserved per block), threads (2,048) and 32 "
         "blocks. Shapes: 6 layer pairs, batch 32, teacher heads of 64; 'D768/12h' is the student "
         "width and heads (student head dim D/H).")


if __name__ == "__main__":
    main()
