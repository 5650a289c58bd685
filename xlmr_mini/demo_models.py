"""The demo's own models, trained once on the built-in demo task and cached: the teacher that
`python -m xlmr_mini.train` distils when no --teacher is given.

The demo data lives in `xlmr_mini.data.demo`; its models live here, beside the trainer that makes
them (the data layer never imports an application). `train` is passed in, not imported, because
`train` is the caller.
"""
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from xlmr_mini.config import XLMRConfig
from xlmr_mini.data import DEMO_VERSION, TaskData, default_cache_dir, load_task
from xlmr_mini.tokenizer import Tokenizer
from xlmr_mini.train_config import TrainConfig

# The demo teacher: from scratch, about a minute on one CPU core, dev macro-F1 ~0.78. Trained from
# random weights it needs the warm-up and many epochs (a 4-layer one learns far slower at this data
# size; lr 2e-3 does not take off). Its 1-layer students distil in ~15 s.
DEMO_TEACHER = dict(layers=2, hidden=128, heads=4, intermediate=512, epochs=60, lr=1e-3, warmup_ratio=0.1)


def demo_teacher(cfg: TrainConfig, train: Callable[..., dict]) -> Path:
    """The demo's teacher: trained from scratch on the demo once, then cached (by demo version and seed)."""
    cache = Path(cfg.cache_dir or default_cache_dir()) / "demo" / f"v{DEMO_VERSION}"
    seed = cfg.seeds[0]
    key = hashlib.sha256(json.dumps(DEMO_TEACHER, sort_keys=True).encode()).hexdigest()[:8]
    final = cache / f"teacher-seed{seed}-{key}"
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        print(f"demo teacher: using the cached one in {final}")
        return final
    t = DEMO_TEACHER
    print(f"demo teacher: training a {t['layers']}-layer, {t['hidden']}-wide classifier from scratch on the demo "
          f"({t['epochs']} epochs; cached for next time)")
    tcfg = TrainConfig(init="from-scratch", data="demo", layers=t["layers"], hidden=t["hidden"], heads=t["heads"],
                       intermediate=t["intermediate"], epochs=t["epochs"], lr=t["lr"], warmup_ratio=t["warmup_ratio"],
                       no_kd=True, seeds=(seed,),
                       batch_size=cfg.batch_size, max_length=cfg.max_length, device=cfg.device,
                       cache_dir=cfg.cache_dir, out=str(final.with_name(final.name + ".work")), overwrite=True,
                       precision=cfg.precision)
    task = load_task("demo", cache_dir=cfg.cache_dir)
    arch = demo_architecture(task)
    results = train(tcfg, arch=arch, quiet=True)
    print(f"demo teacher: dev {tcfg.metric} {100 * results['dev_score']:.2f}%")
    work = Path(tcfg.out)
    tmp = final.with_name("." + final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "best", tmp)
    os.replace(tmp, final)
    shutil.rmtree(work, ignore_errors=True)
    return final


def demo_architecture(task: TaskData) -> XLMRConfig:
    """XLM-R sized for the demo's teacher: its vocabulary, short positions."""
    t = DEMO_TEACHER
    vocab = Tokenizer(task.tokenizer_path).vocab_size
    return XLMRConfig(vocab_size=vocab, hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                      num_attention_heads=t["heads"], intermediate_size=t["intermediate"],
                      max_position_embeddings=130, id2label=task.labels)
