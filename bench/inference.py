"""Inference on CPU: the teacher and its students, full and trimmed vocabulary, xlmr_mini vs transformers.

Models (random weights at the real shapes; speed and size do not depend on the values): the
teacher 12L/768 and students 6L/768 and 6L/384 (12 heads), each with XLM-R's 250,002-row
vocabulary and trimmed to `--kept` rows (default 34,855, what tweet_sentiment_multilingual's
texts use; `python -m xlmr_mini.trim` makes such a model). Each is saved as an HF directory; the
size on disk is its model.safetensors. Then, on the same checkpoint:

- transformers: `XLMRobertaForSequenceClassification.from_pretrained(dir)` (its default SDPA
  attention), fp32, under `torch.inference_mode`;
- xlmr_mini: `xlmr_mini.checkpoint.load_model(dir)`, fp32 and at `--precision auto` (resolved on
  this machine; for bf16 the Linear weights are stored in bf16 once, then bf16 autocast), under
  `torch.inference_mode`.

Latency: one tweet-sized text (batch 1, 32 tokens), median of repeats. Throughput: batch 32,
padded to 64 with lengths 32-64, samples/s at the median.

    python -m bench.inference               # appends to bench/RESULTS.md
    python -m bench.inference --quick       # tiny shapes, prints only
"""
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.harness import append_results, measure
from bench.kd_step import TSM_KEPT
from xlmr_mini.checkpoint import load_model, save_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import scratch_state_dict
from xlmr_mini.data import default_cache_dir
from xlmr_mini.hardware import resolve_precision
from xlmr_mini.kd_step import bf16_frozen_linears
from xlmr_mini.vocab import VocabTrim, trim_config, trim_state_dict

MODELS = {"teacher 12L/768": (12, 768), "student 6L/768": (6, 768), "student 6L/384": (6, 384)}


def inputs(batch: int, seq: int, vocab: int, lengths_from: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (batch, seq), generator=g)
    lengths = torch.randint(lengths_from, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 0
    ids[mask == 0] = 1
    return ids, mask


def write_models(root: Path, args) -> list[tuple[str, str, Path]]:
    """(model, vocabulary, directory) for every model, full and trimmed."""
    out = []
    rng = np.random.default_rng(0)
    kept = np.sort(np.concatenate([np.arange(4), rng.choice(np.arange(4, args.vocab), args.kept - 4, replace=False)]))
    trim = VocabTrim(kept=kept.astype(np.int64), full_size=args.vocab)
    for name, (layers, hidden) in MODELS.items():
        if args.quick:
            layers, hidden = max(1, layers // 4), hidden // 12
        cfg = XLMRConfig(vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=12 if not args.quick else 4,
                         intermediate_size=4 * hidden, id2label=("negative", "neutral", "positive"))
        state = scratch_state_dict(cfg, 0)
        full, trimmed = root / f"{name.split()[1]}-full", root / f"{name.split()[1]}-trimmed"
        save_hf(full, cfg, state)
        save_hf(trimmed, trim_config(cfg, trim), trim_state_dict(state, trim))
        out += [(name, f"full {args.vocab:,}", full), (name, f"trimmed {args.kept:,}", trimmed)]
        del state
    return out


def timings(model_fn, vocab: int, bf16: bool, args) -> tuple[float, float]:
    """(batch-1 latency in ms, batch-32 samples/s)."""
    one, many = inputs(1, 32, vocab, 32), inputs(args.batch, 64, vocab, 32)

    def run(ids, mask):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model_fn(ids, mask)

    latency = measure("b1", lambda: run(*one), items=1, warmup=2, repeats=args.repeats * 3)
    throughput = measure("b32", lambda: run(*many), items=args.batch, warmup=1, repeats=args.repeats)
    return latency.median_s * 1e3, throughput.rate


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=250002)
    p.add_argument("--kept", type=int, default=TSM_KEPT)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object per row; record nothing")
    p.add_argument("--quick", action="store_true", help="tiny shapes, prints only")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.kept, args.repeats = 2000, 300, 1
    from transformers import XLMRobertaForSequenceClassification

    auto = resolve_precision("auto", torch.device("cpu"), 768, default_cache_dir())
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, vocab, path in write_models(Path(tmp), args):
            params = sum(p.numel() for p in load_model(path).parameters())
            disk_mb = (path / "model.safetensors").stat().st_size / 2**20
            hf = XLMRobertaForSequenceClassification.from_pretrained(path).eval()
            ours = load_model(path).eval()
            n_vocab = ours.cfg.vocab_size
            results = {("transformers", "fp32"): timings(lambda i, m: hf(input_ids=i, attention_mask=m).logits, n_vocab, False, args)}
            for precision in dict.fromkeys(["fp32", auto]):
                if precision == "bf16":
                    bf16_frozen_linears(ours)  # weights cast once, not by autocast on every call
                results["xlmr_mini", precision] = timings(lambda i, m: ours(i, m).logits, n_vocab, precision == "bf16", args)
            del hf, ours
            base_latency, base_rate = results["transformers", "fp32"]
            for (impl, precision), (latency, rate) in results.items():
                record = {"model": name, "vocab": vocab, "parameters": params, "disk_mb": disk_mb, "implementation": impl,
                          "precision": precision, "latency_b1_ms": latency, f"samples_per_s_b{args.batch}": rate}
                records.append(record)
                rows.append(f"| {name} | {vocab} | {params / 1e6:,.1f}M | {disk_mb:,.0f} | {impl} | {precision} "
                            f"| {latency:,.1f} | {base_latency / latency:.2f}x | {rate:,.1f} | {rate / base_rate:.2f}x |")
                print(json.dumps(record) if args.json else rows[-1], flush=True)
    header = ("| model | vocabulary | parameters | disk MB | implementation | precision | batch-1 latency ms "
              "| speed vs transformers | batch-32 samples/s | vs transformers |")
    teacher = next(r for r in records if r["model"].startswith("teacher") and r["implementation"] == "xlmr_mini"
                   and r["precision"] == auto and r["vocab"].startswith("full"))
    small = next(r for r in records if r["model"].endswith("6L/384") and r["implementation"] == "xlmr_mini"
                 and r["precision"] == auto and r["vocab"].startswith("trimmed"))
    key = f"samples_per_s_b{args.batch}"
    notes = (f"6L/384 trimmed student vs the full teacher, both xlmr_mini at --precision auto ({auto}): "
             f"{small[key] / teacher[key]:.2f}x the batch-{args.batch} throughput.")
    print(notes)
    if not args.quick and not args.json:
        append_results(f"Inference on CPU: teacher and students, full and trimmed vocabulary (task rows {args.kept:,})",
                       header, rows, notes)


if __name__ == "__main__":
    main()
