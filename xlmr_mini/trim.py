"""Trim a saved model's vocabulary to the tokens a dataset uses: `python -m xlmr_mini.trim`.

    python -m xlmr_mini.trim runs/student/best --data tsm:tweet_sentiment_multilingual/ --out student-tsm/

Writes an HF directory whose word embedding holds only the rows of the pieces that the dataset's
texts (every split, untruncated) segment into, plus the special tokens, and a tokenizer.json
holding the same pieces with the same scores (ids renumbered), which `tokenizers` and
`transformers` load as usual. Every text of the dataset segments into exactly the same pieces as
with the full tokenizer, so the trimmed model's outputs on it are the full model's. Other text
still tokenizes: a piece outside the kept set falls back to smaller kept pieces or <unk>
(`python -m xlmr_mini.evaluate` reports the <unk> rate per language).
"""
import argparse
from pathlib import Path

from xlmr_mini.checkpoint import check_model_dir, check_tokenizer, find_tokenizer, read_hf_state_dict, save_hf
from xlmr_mini.copy_weights import parameter_count
from xlmr_mini.data import encode_split, load_task, parse_spec
from xlmr_mini.errors import InputError, OneLineErrorParser, cli_main
from xlmr_mini.files import check_apart, check_output_dir
from xlmr_mini.tokenizer import Tokenizer, read_tokenizer_json
from xlmr_mini.vocab import always_kept, kept_ids, trim_config, trim_state_dict, trim_tokenizer

UNTRUNCATED = 10**9  # encode whole texts: every piece any text uses is kept


def _parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m xlmr_mini.trim", description=__doc__.split("\n\n")[2],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="HF model directory with its tokenizer.json (a Unigram one, as XLM-R's)")
    p.add_argument("--data", required=True, help="dataset whose tokens to keep: massive:PATH, tsm:PATH, file:PATH, demo")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory: the trimmed config.json, model.safetensors and tokenizer.json")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out directory")
    p.add_argument("--cache-dir", type=Path, help="cache for tokenized data (default: ~/.cache/xlmr_mini)")
    return p


@cli_main
def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    check_apart("--out", args.out, {"model": args.model, "--data": parse_spec(args.data)[1] or None})
    tok_file = find_tokenizer(check_model_dir(args.model, "model"))
    if tok_file is None:
        raise InputError(f"{args.model}: no tokenizer.json beside the model; trimming renumbers the tokenizer too")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise InputError(f"--out {args.out}: directory is not empty; pass --overwrite to replace its files")
    check_output_dir(args.out, "--out")
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir, "--cache-dir")
    cfg, state = read_hf_state_dict(args.model)
    tokenizer = Tokenizer(tok_file)
    check_tokenizer(tokenizer.vocab_size, tok_file, cfg, str(args.model))
    tok_json = read_tokenizer_json(tok_file)
    task = load_task(args.data, cache_dir=args.cache_dir)
    encoded = [encode_split(split, tokenizer, UNTRUNCATED, cache_dir=args.cache_dir) for split in task.splits.values()]
    trim = kept_ids((enc.tokens for enc in encoded), cfg.vocab_size, always_kept(tok_json))
    trimmed_tokenizer = trim_tokenizer(tok_json, trim)  # raises first for a tokenizer that cannot be trimmed
    trimmed = trim_state_dict(state, trim)
    save_hf(args.out, trim_config(cfg, trim), trimmed, trimmed_tokenizer)
    summary = {"kept": trim.size, "vocab": cfg.vocab_size, "parameters": parameter_count(state),
               "trimmed_parameters": parameter_count(trimmed)}
    print(f"kept {trim.size:,} of {cfg.vocab_size:,} pieces (every token of {task.source}'s "
          f"{sum(len(e) for e in encoded):,} texts and the special tokens); parameters "
          f"{summary['parameters'] / 1e6:.1f}M -> {summary['trimmed_parameters'] / 1e6:.1f}M; wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
