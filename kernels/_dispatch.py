"""Which path a kernel's functional alias runs, and a guarded `import triton`.

The Triton path runs when the inputs are CUDA tensors, or when they are CPU tensors and
`TRITON_INTERPRET=1` (Triton's CPU interpreter: slow, for tests). Everywhere else (CPU without the
interpreter, or no Triton, e.g. on macOS and Windows) the alias runs the PyTorch reference, so
training works on any machine.

Triton reads `TRITON_INTERPRET` when a kernel is defined (at import), so set it before importing
`xlmr_mini.kernels`; the switch here reads it at call time only to choose between the two paths.
"""
import os

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
