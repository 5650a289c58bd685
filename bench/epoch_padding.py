"""One training epoch on the real tweets: length-bucketed dynamic padding vs padding to 128.

tweet_sentiment_multilingual (the seen languages' train split), XLM-R's real tokenizer, a
6-layer / 384-wide student with XLM-R's 250,002-piece vocabulary, batch 32, forward+backward
with cross-entropy (the student's share of a KD step). The padded token count is exact for the
whole epoch; the time per epoch is the measured median time per batch of a fixed sample of
batches (the same sample positions in both layouts) times the number of batches.

    python -m bench.epoch_padding --data PATH/TO/tweet_sentiment_multilingual
"""
import argparse

import numpy as np
import torch

from bench.harness import append_results, measure
from xlmr_mini.config import XLMRConfig
from xlmr_mini.data import encode_split, epoch_batches, load_task, select_languages
from xlmr_mini.model import XLMRClassifier, init_weights
from xlmr_mini.tokenizer import Tokenizer


def pad_to(batch, length, pad_id):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = length - ids.shape[1]
    return (torch.nn.functional.pad(ids, (0, extra), value=pad_id), torch.nn.functional.pad(mask, (0, extra)))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.epoch_padding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="tweet_sentiment_multilingual directory (xlm-t layout)")
    p.add_argument("--tokenizer", required=True, help="XLM-R tokenizer.json")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sample-batches", type=int, default=6, help="batches timed per layout")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    task = load_task(f"tsm:{args.data}")
    tok = Tokenizer(args.tokenizer)
    train = select_languages(task.splits["train"], "seen", task)
    enc = encode_split(train, tok, max_length=128)
    batches = epoch_batches(enc, args.batch_size, seed=0, epoch=0, pad_id=tok.pad_id)
    real = int(enc.lengths.sum())
    bucketed = sum(b["input_ids"].numel() for b in batches)
    fixed = len(batches) * args.batch_size * 128 - (args.batch_size - len(batches[-1]["labels"])) * 128
    print(f"{len(enc)} examples, {len(batches)} batches; tokens: real {real:,}, bucketed {bucketed:,}, pad-128 {fixed:,}")

    cfg = XLMRConfig(vocab_size=tok.vocab_size, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, id2label=task.labels)
    torch.manual_seed(0)
    model = XLMRClassifier(cfg)
    init_weights(model, cfg.initializer_range)
    sample = np.linspace(0, len(batches) - 1, args.sample_batches).round().astype(int)

    def run(layout):
        def step():
            for i in sample:
                b = batches[int(i)]
                ids, mask = (b["input_ids"], b["attention_mask"]) if layout == "bucketed" else pad_to(b, 128, tok.pad_id)
                model.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(ids, mask).logits, b["labels"]).backward()
        return step

    rows, times = [], {}
    for layout, tokens in (("pad to 128", fixed), ("bucketed", bucketed)):
        m = measure(layout, run(layout), items=len(sample) * args.batch_size, warmup=1, repeats=3)
        epoch_s = m.median_s / len(sample) * len(batches)
        times[layout] = epoch_s
        rows.append(f"| {layout} | {tokens:,} | {tokens / real:.2f}x | {m.rate:,.1f} | {epoch_s:,.0f} |")
        print(rows[-1], flush=True)
    speedup = times["pad to 128"] / times["bucketed"]
    notes = f"Epoch time ratio pad-128 / bucketed: **{speedup:.2f}x** (same run, same sampled batch positions)."
    print(notes)
    if not args.no_record:
        header = "| layout | tokens per epoch | vs real tokens | samples/s | est. s/epoch |"
        append_results(f"Epoch on real tweets (TSM seen languages, {len(enc):,} examples): bucketed vs pad-128, "
                       f"student 6L/384, batch {args.batch_size}, fwd+bwd", header, rows, notes)


if __name__ == "__main__":
    main()
