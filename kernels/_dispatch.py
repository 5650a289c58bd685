"""Which path a kernel's functional alias runs, and a guarded `import triton`.

The Triton path runs when the inputs are CUDA tensors, or when they are CPU tensors and
`TRITON_INTERPRET=1` (Triton's CPU interpreter: slow, for tests). Everywhere else (CPU without the
interpreter, or no Triton, e.g. on macOS and Windows) the alias runs the PyTorch reference, so
training works on any machine.

Triton reads `TRITON_INTERPRET` when a kernel is defined (at import), so set it before importing
`xlmr_mini.kernels`; the switch here reads it at call time only to choose between the two paths.

Launchers pick their grid, block sizes, warps and stages with a pure function of shapes and dtypes
returning a `LaunchConfig`, and start kernels through `launch`. `record_launches` makes `launch`
record instead of run: the ahead-of-time report (`python -m bench.kernels_aot`) runs the launchers
on meta tensors and compiles exactly what they would launch for sm_80 and sm_90, without a GPU.
"""
import contextlib
import os
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the package must import without Triton; kernels are then never launched

    class _NoTriton:
        """Stands in for `triton` and `triton.language` so kernel definitions still parse."""

        constexpr = None
        float32 = int64 = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.assume_constant_result
def _triton_for(device_type: str) -> bool:
    # A constant to torch.compile: the path is fixed per compiled graph (recompile to change it).
    if not HAS_TRITON:
        return False
    return device_type == "cuda" or (device_type == "cpu" and interpreting())


def use_triton(x: torch.Tensor) -> bool:
    """True if the fused Triton kernel should run for inputs on `x`'s device."""
    return _triton_for(x.device.type)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))  # not triton.cdiv: configs are chosen without Triton too


@dataclass(frozen=True)
class LaunchConfig:
    """How a kernel is launched. `max_stack_bytes` is the local-memory (spill) bound the compiled
    kernel is held to on sm_80 and sm_90 (tests/test_kernels_aot.py); a config that cannot be
    spill-free says `why` beside it."""

    grid: tuple[int, ...]
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    max_stack_bytes: int = 0
    why: str = ""


@dataclass(frozen=True)
class Launch:
    """One recorded launch: the kernel, its positional arguments, its config."""

    kernel: object
    args: tuple
    config: LaunchConfig


_recorded: list[Launch] | None = None


@contextlib.contextmanager
def record_launches():
    """Within the block, `launch` appends to the yielded list instead of starting kernels."""
    global _recorded
    outer, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = outer


def launch(kernel, config: LaunchConfig, *args) -> None:
    if _recorded is not None:
        _recorded.append(Launch(kernel, args, config))
        return
    with _device_of(args):
        kernel[config.grid](*args, **config.constexprs, num_warps=config.num_warps,
                            num_stages=config.num_stages)


def _device_of(args):
    """Triton launches on the current CUDA device, not the inputs': make theirs current (cuda:1
    under `--device cuda:1` while cuda:0 is current)."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
