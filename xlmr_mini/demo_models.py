"""The demo's own models, trained once on the built-in demo task and cached: the teacher that
`python -m xlmr_mini.train` distils when no --teacher is given, and a small pretrained base (a
short masked-language-model pretraining on the demo's multilingual text, all six languages, no
labels), the demo's stand-in for xlm-roberta-base, so that `--init from-base` runs on the demo.

The demo data lives in `xlmr_mini.data.demo`; its models live here, beside the trainer that makes
them (the data layer never imports an application). `train` is passed in, not imported, because
`train` is the caller.
"""
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xlmr_mini import distributed
from xlmr_mini.checkpoint import build_model, hf_state_dict, save_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import scratch_state_dict
from xlmr_mini.data import DEMO_VERSION, TaskData, default_cache_dir, encode_split, epoch_batches, load_task
from xlmr_mini.kd_step import linear_schedule, make_optimizer
from xlmr_mini.model import Taps
from xlmr_mini.tokenizer import Tokenizer
from xlmr_mini.train_config import DEMO_THREADS, TrainConfig

# The demo teacher: from scratch, about a minute on one CPU core, dev macro-F1 ~0.78. Trained from
# random weights it needs the warm-up and many epochs (a 4-layer one learns far slower at this data
# size; lr 2e-3 does not take off). Its 1-layer students distil in ~15 s.
DEMO_TEACHER = dict(layers=2, hidden=128, heads=4, intermediate=512, epochs=60, lr=1e-3, warmup_ratio=0.1)
# The demo base: the teacher's sizes, masked-LM pretrained (BERT's 15% masking, 80/10/10).
DEMO_BASE = dict(epochs=40, lr=1e-3, warmup_ratio=0.06, batch_size=32, mask_prob=0.15, seed=0)


def demo_teacher(cfg: TrainConfig, train: Callable[..., dict]) -> Path:
    """The demo's teacher: trained from scratch on the demo once, then cached (by demo version and seed)."""
    seed = cfg.seeds[0]
    final = _cached(cfg.cache_dir, f"teacher-seed{seed}", DEMO_TEACHER)
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
    distributed.on_main(_keep, Path(tcfg.out), final)  # under torchrun every rank trained it, rank 0 keeps it
    return final


def _keep(work: Path, final: Path) -> None:
    tmp = final.with_name("." + final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "best", tmp)
    os.replace(tmp, final)
    shutil.rmtree(work, ignore_errors=True)


def demo_architecture(task: TaskData) -> XLMRConfig:
    """XLM-R sized for the demo's teacher: its vocabulary, short positions."""
    t = DEMO_TEACHER
    vocab = Tokenizer(task.tokenizer_path).vocab_size
    return XLMRConfig(vocab_size=vocab, hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                      num_attention_heads=t["heads"], intermediate_size=t["intermediate"],
                      max_position_embeddings=130, id2label=task.labels)


def _cached(cache_dir, name: str, settings: dict) -> Path:
    """Where a demo model with these settings is cached (by demo version and a hash of them)."""
    cache = Path(cache_dir or default_cache_dir()) / "demo" / f"v{DEMO_VERSION}"
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return cache / f"{name}-{key}"


class MaskedLMHead(nn.Module):
    """RoBERTa's LM head: dense -> gelu -> LayerNorm -> decoder tied to the word embeddings."""

    def __init__(self, cfg: XLMRConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.word = word_embeddings
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layer_norm(F.gelu(self.dense(h))), self.word.weight, self.bias)  # [N, V]


def mask_tokens(ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, vocab: int, p: float,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each maskable token is chosen with probability p; of those 80% become
    <mask>, 10% a random token, 10% stay. Returns (inputs, labels with -100 where not chosen)."""
    chosen = (torch.rand(ids.shape, generator=g) < p) & maskable
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=g)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    random_ids = torch.randint(4, vocab, ids.shape, generator=g)
    return torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs), labels


def demo_base(cache_dir=None, quiet: bool = False) -> Path:
    """The demo's pretrained base, an HF masked-LM directory: trained once, then cached."""
    final = _cached(cache_dir, "base", {**DEMO_BASE, **DEMO_TEACHER})
    if (final / "model.safetensors").is_file():
        return final
    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_THREADS)  # a tiny model: one thread beats two
    try:
        _pretrain_base(final, cache_dir, quiet)
    finally:
        torch.set_num_threads(threads)
    return final


def _pretrain_base(final: Path, cache_dir, quiet: bool) -> None:
    task = load_task("demo", cache_dir=cache_dir)
    arch = demo_architecture(task)
    b = DEMO_BASE
    if not quiet:
        print(f"demo base: masked-LM pretraining a {arch.num_hidden_layers}-layer, {arch.hidden_size}-wide encoder on "
              f"the demo's text ({b['epochs']} epochs; cached for next time)")
    model = build_model(arch, scratch_state_dict(arch, b["seed"])).train()
    head = MaskedLMHead(arch, model.embed.word)
    tok = Tokenizer(task.tokenizer_path)
    mask_id = tok.mask_id  # the last id, as in XLM-R
    enc = encode_split(task.splits["train"], tok, 128, cache_dir=cache_dir)
    steps_per_epoch = len(epoch_batches(enc, b["batch_size"], seed=b["seed"], epoch=0, pad_id=tok.pad_id))
    total = b["epochs"] * steps_per_epoch
    params = list(model.parameters()) + [p for n, p in head.named_parameters() if not n.startswith("word.")]
    optimizer = make_optimizer(params, b["lr"], 0.0)
    schedule = linear_schedule(optimizer, total, math.ceil(b["warmup_ratio"] * total))
    g = torch.Generator().manual_seed(b["seed"])
    last = Taps(layers=(arch.num_hidden_layers - 1,), hidden=True)
    for epoch in range(b["epochs"]):
        for batch in epoch_batches(enc, b["batch_size"], seed=b["seed"], epoch=epoch, pad_id=tok.pad_id):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            inputs, labels = mask_tokens(ids, mask.bool() & (ids > 3), mask_id, arch.vocab_size, b["mask_prob"], g)
            h = model(inputs, mask, last).hidden[-1]  # [B, T, D]
            keep = labels != -100
            loss = F.cross_entropy(head(h[keep]), labels[keep])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    if not quiet:
        print(f"demo base: final masked-LM loss {loss.item():.3f}")
    _save_base(final, arch, model, head, task.tokenizer_path)


def _save_base(final: Path, arch: XLMRConfig, model, head: MaskedLMHead, tokenizer_file) -> None:
    """An HF XLMRobertaForMaskedLM directory (no classifier), written aside and renamed in."""
    state = {k: v for k, v in hf_state_dict(model).items() if not k.startswith("classifier.")}
    state.update({"lm_head.dense.weight": head.dense.weight, "lm_head.dense.bias": head.dense.bias,
                  "lm_head.layer_norm.weight": head.layer_norm.weight, "lm_head.layer_norm.bias": head.layer_norm.bias,
                  "lm_head.bias": head.bias})
    tmp = final.with_name("." + final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(tmp, arch.replace(id2label=("LABEL_0", "LABEL_1")), state, tokenizer_file)
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    config["architectures"] = ["XLMRobertaForMaskedLM"]
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, final)
