"""`python -m xlmr_mini.data SPEC`: what a dataset spec loads, per split and language.

    python -m xlmr_mini.data massive:/data/massive/1.1/data
    python -m xlmr_mini.data tsm:/data/tweet_sentiment_multilingual --langs seen --subset 0.1
    python -m xlmr_mini.data demo --tokenizer auto
"""
import argparse
import json

import numpy as np

from xlmr_mini.data.batching import encode_split
from xlmr_mini.data.partitions import LANGUAGE_CHOICES, select_languages
from xlmr_mini.data.readers import SPEC_HELP, load_task
from xlmr_mini.data.subsets import stratified_subset
from xlmr_mini.errors import InputError, cli_main, deprecated_alias


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xlmr_mini.data", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", default="demo", help=f"dataset: {SPEC_HELP} (default: demo)")
    p.add_argument("--langs", default="all",
                   help=f"training languages to keep: {' | '.join(LANGUAGE_CHOICES)} | a comma-separated list (default: all)")
    p.add_argument("--subset", type=float, default=1.0,
                   help="stratified fraction of the train split, e.g. 0.05 (default: 1; train's --subset)")
    deprecated_alias(p, "--fraction", "--subset", dest="subset", type=float)
    p.add_argument("--seed", type=int, default=0, help="seed of the subset (default: 0, the one train uses)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json to report token lengths with; 'auto' = the demo's own")
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens per example including <s> and </s>, for the token lengths (default: 128)")
    p.add_argument("--cache-dir", default=None,
                   help="cache for tokenized data and the demo (default: $XLMR_MINI_CACHE or ~/.cache/xlmr_mini)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


@cli_main
def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    task = load_task(args.spec, cache_dir=args.cache_dir)
    splits = dict(task.splits)
    splits["train"] = select_languages(splits["train"], args.langs, task)
    if args.subset != 1.0:
        splits["train"] = stratified_subset(splits["train"], args.subset, args.seed)
    tokenizer = None
    if args.tokenizer:
        from xlmr_mini.tokenizer import Tokenizer

        if args.tokenizer == "auto" and task.tokenizer_path is None:
            raise InputError(f"--tokenizer auto: {task.name} has no tokenizer of its own; pass a tokenizer.json")
        tokenizer = Tokenizer(task.tokenizer_path if args.tokenizer == "auto" else args.tokenizer)
    report = {"task": task.name, "source": task.source, "labels": task.num_labels,
              "unseen": sorted(set(task.languages) & task.unseen), "splits": {}, "notes": list(task.notes)}
    for name, split in splits.items():
        entry = {"examples": len(split), "languages": split.counts(),
                 "labels_present": int(len(np.unique(split.labels)))}
        if tokenizer is not None:
            lengths = encode_split(split, tokenizer, args.max_length, cache_dir=args.cache_dir).lengths
            entry["tokens"] = {"mean": round(float(lengths.mean()), 1), "p99": int(np.percentile(lengths, 99)),
                               "max": int(lengths.max()), "padding_to_max_length_x": round(args.max_length / float(lengths.mean()), 1)}
        report["splits"][name] = entry
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return report
    print(f"{task.name} from {task.source}: {task.num_labels} labels, {len(task.languages)} languages"
          f" (unseen here: {', '.join(report['unseen']) or 'none'})")
    for name, entry in report["splits"].items():
        langs = "  ".join(f"{lang}={n}" for lang, n in entry["languages"].items())
        print(f"  {name:5s} {entry['examples']:7d} examples, {entry['labels_present']} labels present: {langs}")
        if "tokens" in entry:
            t = entry["tokens"]
            print(f"        tokens per example: mean {t['mean']}, p99 {t['p99']}, max {t['max']}")
    for note in task.notes:
        print(f"  note: {note}")
    return report


if __name__ == "__main__":
    main()
