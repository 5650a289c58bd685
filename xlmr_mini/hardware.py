"""Devices and precision: resolve `--device auto|cpu|cuda[:N]` to a torch.device and
`--precision auto|fp32|bf16` to the precision that is fastest on this hardware.

`auto` picks bf16 autocast on CUDA devices that support bf16, and on CPUs where a short probe
measures bf16 matmuls faster than fp32 (CPUs with AVX512-BF16 or AMX: 2-5x; without bf16 units
bf16 is several times slower). The probe takes about a second and is cached per CPU model and
torch version. Models narrower than `MIN_BF16_HIDDEN` stay fp32: their matmuls are too small for
bf16 to pay for autocast's casts (the demo's 128-wide models run no faster), and fp32 keeps their
runs reproducible.
"""
import contextlib
import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from xlmr_mini.errors import InputError
from xlmr_mini.files import atomic_write

PRECISIONS = ("auto", "fp32", "bf16")
MIN_BF16_HIDDEN = 256
MIN_BF16_SPEEDUP = 1.2  # bf16 must beat fp32 clearly: it also costs accuracy
PROBE_SHAPE = (1024, 768, 3072)  # (tokens, in, out): a BERT-base MLP matmul at batch 16 x 64 tokens


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a device this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise InputError(f"--device {name}: not supported; choose cpu, cuda, cuda:N or auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """Within the block, PyTorch's deterministic algorithms (SDPA's memory-efficient backward,
    index_add, ... switch to their deterministic versions; an op with none raises) and a fixed
    cuBLAS workspace (cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it first starts; a value the user
    set is kept). Does nothing when not `enabled`."""
    if not enabled:
        yield
        return
    was = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def resolve_precision(name: str, device: torch.device, hidden_size: int, cache_dir: str | Path) -> str:
    """`fp32` or `bf16` for `--precision name` on `device` for models `hidden_size` wide."""
    if name not in PRECISIONS:
        raise InputError(f"--precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if name == "bf16" and device.type == "cuda" and not cuda_bf16(device):
        raise InputError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    if name != "auto":
        return name
    if hidden_size < MIN_BF16_HIDDEN:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if cuda_bf16(device) else "fp32"
    return "bf16" if cpu_bf16_speedup(cache_dir)["speedup"] >= MIN_BF16_SPEEDUP else "fp32"


def cuda_bf16(device: torch.device) -> bool:
    """Whether the GPU `device` (not the current one) computes in bfloat16 natively (Ampere and
    later). Emulated bf16 (V100, T4) does not count: it is slower than fp32 there."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def synchronize(device) -> None:
    """Wait for the work queued on a GPU `device` (CPU work is done when its call returns)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# The instruction sets that decide how fast this CPU runs fp32 and bf16 matmuls (x86, then Arm).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "bf16")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its ISA_FLAGS, e.g. "AMD EPYC (avx2, avx512f, avx512_bf16)", from
    `cpuinfo` (default: /proc/cpuinfo). The name alone does not tell machines apart: one cloud sells
    CPUs with and without bf16 units under one name, and a probe cached for one (bf16 fast, or 80x
    slower) must not decide for the other."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    name, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name is None:
            name = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    name = name or platform.processor() or platform.machine()
    isa = [f for f in ISA_FLAGS if f in flags]
    return f"{name} ({', '.join(isa)})" if isa else name


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, the CPU model otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def cached_probe(cache_dir: str | Path, kind: str, machine: str, probe: Callable[[], dict],
                 refresh: bool = False) -> tuple[dict, bool]:
    """(`probe()`'s result, whether it came from the cache): run once per `machine` (the hardware
    and software it depends on) and cached as JSON in `cache_dir/hardware/`."""
    path = Path(cache_dir) / "hardware" / f"{kind}-{hashlib.sha256(machine.encode()).hexdigest()[:16]}.json"
    if path.is_file() and not refresh:
        try:
            return json.loads(path.read_text(encoding="utf-8")), True
        except json.JSONDecodeError:
            pass
    result = probe()
    atomic_write(path, json.dumps(result, indent=1) + "\n")
    return result, False


def cpu_bf16_speedup(cache_dir: str | Path, refresh: bool = False) -> dict:
    """fp32 time / bf16 time of one matmul on this CPU, measured once per CPU model and torch
    version and cached in `cache_dir/hardware/`: {"cpu", "torch", "fp32_s", "bf16_s", "speedup"}."""
    machine = f"{cpu_model()}|{torch.__version__}|{torch.get_num_threads()} threads"
    return cached_probe(cache_dir, "bf16-probe", machine, _bf16_probe, refresh)[0]


def _bf16_probe() -> dict:
    tokens, n_in, n_out = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, n_in, generator=g), torch.randn(n_in, n_out, generator=g)
    times = {dtype: _median_time(lambda a=x.to(dtype), b=w.to(dtype): a @ b) for dtype in (torch.float32, torch.bfloat16)}
    return {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "fp32_s": times[torch.float32], "bf16_s": times[torch.bfloat16],
            "speedup": times[torch.float32] / times[torch.bfloat16]}


def _median_time(fn, repeats: int = 5) -> float:
    fn()  # warm-up: the first bf16 call may pick kernels
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
