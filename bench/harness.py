"""One small benchmark harness: warm-up apart, median and spread of repeats, peak memory, a rate.

Every benchmark in bench/ times its work with `measure` and writes rows with `append_results`, which
stamps them with the device, software versions, command and date.
"""
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from xlmr_mini.hardware import cpu_model


@dataclass
class Measurement:
    name: str
    median_s: float
    spread_s: float  # (max - min) / 2 over the timed repeats
    peak_mem_mb: float
    rate: float  # items per second at the median
    rate_unit: str

    def row(self) -> str:
        return (
            f"| {self.name} | {self.median_s * 1e3:.2f} ± {self.spread_s * 1e3:.2f} | "
            f"{self.rate:,.1f} {self.rate_unit} | {self.peak_mem_mb:,.0f} |"
        )


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRSS:
    """Peak resident memory on CPU while the block runs, sampled by a thread, above the start."""

    def __enter__(self):
        import threading

        self.base = rss_mb()
        self.peak = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_mb())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def measure(name, fn, items: float, rate_unit: str = "samples/s", warmup: int = 2, repeats: int = 5,
            device: torch.device | str = "cpu", mem_base_mb: float | None = None) -> Measurement:
    """Run `fn()` `warmup` times untimed, then `repeats` times timed; `items` per call sets the rate.

    Peak memory during the timed runs, above `mem_base_mb` (default: what was in use when they
    started): on CUDA `max_memory_allocated`; on CPU the resident set size, sampled by a thread
    (see `rss_mb`; run with MALLOC_MMAP_THRESHOLD_ set low so freed tensors leave the RSS).
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    gc.collect()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if mem_base_mb is None else mem_base_mb * 2**20
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        with _PeakRSS() as rss:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        peak = rss.peak - (rss.base if mem_base_mb is None else mem_base_mb)
    med = statistics.median(times)
    return Measurement(name, med, (max(times) - min(times)) / 2, peak, items / med, rate_unit)


def environment(device: str | None = None) -> str:
    """One line naming the device (`device` if given) and software versions."""
    if device is not None:
        dev = device
    elif torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        dev = f"CPU ({cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads)"
    versions = [f"torch {torch.__version__}"]
    for mod in ("triton", "transformers"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return f"{dev}; Python {platform.python_version()}; " + ", ".join(versions)


def append_results(title: str, header: str, rows: list[str], notes: str = "",
                   path: str = os.path.join(os.path.dirname(__file__), "RESULTS.md"), device: str | None = None):
    """Append one dated section to bench/RESULTS.md (written atomically); `device` names what the
    numbers come from when it is not the machine running (an ahead-of-time compile)."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(os.path.dirname(__file__)))
    command = " ".join(["python -m " + script.removesuffix(".py").replace(os.sep, "."), *sys.argv[1:]])
    section = [
        f"\n## {title}",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {environment(device)}",
        f"- command: `{command}`",
        "",
        header,
        "|" + "|".join(["---"] * (header.count("|") - 1)) + "|",
        *rows,
    ]
    if notes:
        section += ["", notes]
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(old + "\n".join(section) + "\n")
    os.replace(tmp, path)
    print("\n".join(section))
