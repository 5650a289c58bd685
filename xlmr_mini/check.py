"""`python -m xlmr_mini.check DIR`: load an HF XLM-R checkpoint natively and classify a few texts."""
import argparse
import logging

import torch

from xlmr_mini.checkpoint import check_model_dir, check_tokenizer, find_tokenizer, load_model
from xlmr_mini.errors import InputError, OneLineErrorParser, cli_main
from xlmr_mini.tokenizer import Tokenizer


def _parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m xlmr_mini.check", description=__doc__)
    p.add_argument("model", help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the model directory)")
    p.add_argument("--text", action="append", help="text to classify (repeatable)")
    return p


@cli_main
def main(argv=None):
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_model(check_model_dir(args.model, "model")).eval()
    cfg = model.cfg
    tok_path = args.tokenizer or find_tokenizer(args.model)
    tokenizer = Tokenizer(tok_path) if tok_path is not None else None
    if tokenizer is not None:
        check_tokenizer(tokenizer.vocab_size, tok_path, cfg, args.model)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"{args.model}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
          f"{cfg.num_labels} labels, {n_params / 1e6:.1f}M parameters")
    if not args.text:
        return
    if tokenizer is None:
        raise InputError(f"{args.model}: no tokenizer.json in the model directory; pass --tokenizer")
    ids, mask = tokenizer(args.text)
    with torch.inference_mode():
        probs = model(ids, mask).logits.softmax(-1)
    for text, row in zip(args.text, probs):
        k = int(row.argmax())
        print(f"{cfg.id2label[k]}\t{row[k]:.3f}\t{text}")


if __name__ == "__main__":
    main()
