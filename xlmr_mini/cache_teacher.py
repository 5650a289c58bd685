"""Compute a teacher's outputs for a distillation run and keep them (`teacher_cache`), without training.

    python -m xlmr_mini.cache_teacher --teacher DIR --data tsm:PATH --layers 6 [train flags] [--out DIR]

It takes `python -m xlmr_mini.train`'s flags: the cache it writes is the one a `train` command
with the same teacher, data, languages, subset, maximum length, precision and taps reads (the
student's width, init and seed do not enter the key). The study runs it as its own stage before a
teacher's students, so parallel students never build the same cache twice. --teacher-cache auto
(the default) builds it where it fits the free disk (`teacher_cache.DISK_SHARE`) and otherwise
says why in one line and leaves the students to run their teacher live; `on` that cannot fit is bad
input; `off` is refused (there would be nothing to do). With --out it writes `cache.json` there
(the cache's directory and size, or "cache": null where auto left it off).
"""
import functools
import json
from pathlib import Path

import torch

from xlmr_mini import teacher_cache
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import layer_map, student_config
from xlmr_mini.errors import InputError, cli_main
from xlmr_mini.files import atomic_write
from xlmr_mini.hardware import resolve_device
from xlmr_mini.kd_loss import KDLossConfig, kd_taps
from xlmr_mini.run_setup import load_teacher, prepare, resolve_run_precision, student_spec
from xlmr_mini.step_impl import plan_step
from xlmr_mini.train_config import TrainConfig, parse_config

RESULT_FILE = "cache.json"


def cache_teacher(cfg: TrainConfig) -> dict:
    """Build (or find complete) the teacher cache of the run `cfg`; returns what cache.json holds."""
    if cfg.no_kd or cfg.teacher is None:
        raise InputError("--teacher: caching the teacher's outputs needs a distillation run's flags with --teacher "
                         "(and without --no-kd)")
    if cfg.teacher_cache == "off":
        raise InputError("--teacher-cache off: cache_teacher only builds the teacher cache; give auto or on")
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        device = resolve_device(cfg.device)
        setup = prepare(cfg)
        cfg = resolve_run_precision(cfg, setup, device)
        tcfg = XLMRConfig.from_hf(setup.teacher_dir)
        student_layers = student_config(tcfg, student_spec(cfg, setup)).num_hidden_layers
        lmap = layer_map(tcfg.num_hidden_layers, student_layers, cfg.layer_map)
        impl = plan_step(cfg.kd_impl, cfg.compile, device, True, cfg.loss_norm).kd_impl  # as the run resolves it
        taps = kd_taps(KDLossConfig(att_target=cfg.att_target, impl=impl, loss_norm=cfg.loss_norm), lmap)
        bf16 = cfg.precision == "bf16"
        load = functools.partial(load_teacher, setup, device, setup.vocab, bf16)
        cache = teacher_cache.for_run(cfg, setup, tcfg, taps, bf16, device, 0, load, shared=True)
    finally:
        torch.set_num_threads(threads)
    result = {"cache": None if cache is None else str(cache.path), "bytes": 0 if cache is None else cache.bytes,
              "examples": len(setup.splits["train"]), "precision": cfg.precision}
    if cfg.out:
        atomic_write(Path(cfg.out) / RESULT_FILE, json.dumps(result, indent=1) + "\n")
    return result


@cli_main
def main(argv=None) -> dict:
    result = cache_teacher(parse_config(argv))
    if result["cache"] is None:  # auto left it off and said why
        return result
    print(f"teacher cache: {result['cache']} ({teacher_cache.size_text(result['bytes'])}, {result['examples']} "
          f"examples, {result['precision']})")
    return result


if __name__ == "__main__":
    main()
