"""Encoder forward and forward+backward: xlmr_mini vs transformers (eager and sdpa attention).

Base size (12 layers, 768 hidden, 12 heads, 3072 intermediate, vocab 250,002), batch 32, seq 64,
fp32 and bf16 autocast, on whatever device is present. All three models hold the same weights.
Rates are samples/s; ratios are ours / the faster transformers variant, measured in the same run.

    python -m bench.encoder              # full run, appends to bench/RESULTS.md
    python -m bench.encoder --quick      # small shapes, prints only
"""
import argparse
import contextlib

import torch

from bench.harness import append_results, measure
from xlmr_mini.checkpoint import build_model, canonical_key
from xlmr_mini.config import XLMRConfig


def make_models(args, device):
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    hf_cfg = XLMRobertaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                              num_attention_heads=args.heads, intermediate_size=4 * args.hidden, num_labels=3,
                              max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    models = {}
    for impl in ("eager", "sdpa"):
        hf_cfg._attn_implementation = impl
        models[f"transformers-{impl}"] = XLMRobertaForSequenceClassification(hf_cfg)
    models["transformers-sdpa"].load_state_dict(models["transformers-eager"].state_dict())
    state = {canonical_key(k): v.clone() for k, v in models["transformers-eager"].state_dict().items()}
    models["xlmr_mini"] = build_model(XLMRConfig.from_hf_dict(hf_cfg.to_dict()), state)
    return {name: m.to(device).eval() for name, m in models.items()}


def step_fn(name, model, ids, mask, labels, backward):
    hf = name.startswith("transformers")

    def logits():
        return model(input_ids=ids, attention_mask=mask).logits if hf else model(ids, mask).logits

    if not backward:
        def fwd():
            with torch.inference_mode():
                logits()
        return fwd

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(logits().float(), labels).backward()
    return fwd_bwd


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.encoder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=250002)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repeat, nothing recorded")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab, args.batch, args.seq, args.repeats = 2, 64, 4, 1000, 4, 16, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = make_models(args, device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=g)
    mask[torch.arange(args.seq)[None, :] >= lengths[:, None]] = 0  # realistic padding
    ids[mask == 0] = 1
    ids, mask = ids.to(device), mask.to(device)
    labels = torch.randint(0, 3, (args.batch,), generator=g).to(device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for backward in (False, True):
            rates = {}
            for name, model in models.items():
                autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
                fn = step_fn(name, model, ids, mask, labels, backward)

                def run(fn=fn, autocast=autocast):
                    with autocast:
                        fn()
                m = measure(name, run, items=args.batch, warmup=1, repeats=args.repeats, device=device)
                rates[name] = m
                print(f"{'fwd+bwd' if backward else 'fwd'} {str(dtype)[6:]} {m.row()}", flush=True)
            best_hf = max(rates["transformers-eager"].rate, rates["transformers-sdpa"].rate)
            for name, m in rates.items():
                ratio = m.rate / best_hf
                rows.append(f"| {'fwd+bwd' if backward else 'fwd'} | {str(dtype)[6:]} | {name} | "
                            f"{m.median_s * 1e3:,.0f} ± {m.spread_s * 1e3:,.0f} | {m.rate:,.1f} | {ratio:.2f}x | {m.peak_mem_mb:,.0f} |")
    header = "| pass | dtype | implementation | ms/step (median ± half-range) | samples/s | vs best transformers | peak mem above start (MB) |"
    title = (f"Encoder forward / forward+backward, {args.layers}L/{args.hidden}/{args.heads}h, vocab {args.vocab:,}, "
             f"batch {args.batch}, seq {args.seq} (padded, lengths {args.seq // 2}-{args.seq})")
    if args.quick:
        print("\n".join(rows))
    else:
        append_results(title, header, rows)


if __name__ == "__main__":
    main()
