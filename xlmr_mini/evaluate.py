"""Evaluate a classifier per language: micro-F1 (the paper's F1) and macro-F1, seen/unseen partitions, a table.

    python -m xlmr_mini.evaluate --model runs/demo/best --data demo
    python -m xlmr_mini.evaluate --init from-teacher --teacher DIR --layers 6 --data tsm:PATH

The second form copies a student from the teacher and evaluates it with no training at all (the
paper's Table 5, "without finetune"). Scores are defined in `xlmr_mini.metrics`.
"""
import argparse
import json
from pathlib import Path

from xlmr_mini.checkpoint import build_model, check_model_dir, check_tokenizer, find_tokenizer, load_model
from xlmr_mini.config import check_max_length
from xlmr_mini.copy_weights import INITS, StudentSpec, init_student
from xlmr_mini.data import default_cache_dir, encode_split, load_task, select_languages
from xlmr_mini.errors import InputError, OneLineErrorParser, cli_main
from xlmr_mini.files import atomic_write, check_output_dir, check_output_file
from xlmr_mini.hardware import PRECISIONS, resolve_device, resolve_precision
from xlmr_mini.inference import evaluate, final_split, label_ids, to_model_labels
from xlmr_mini.metrics import format_table
from xlmr_mini.model import XLMRClassifier
from xlmr_mini.tokenizer import Tokenizer


def _parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m xlmr_mini.evaluate",
        description="Micro-F1 (the paper's F1, = accuracy) and macro-F1 of an XLM-R classifier, overall, per "
        "language and on the paper's seen/unseen language partitions. Either --model DIR (a saved HF directory), or --init from-teacher "
        "--teacher DIR --layers N to evaluate a weight-copied student with no training (paper Table 5).",
    )
    p.add_argument("--model", type=Path, help="HF model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--init", choices=INITS, help="instead of --model: initialize a student like `train --init` and evaluate it untrained")
    p.add_argument("--teacher", type=Path, help="teacher directory for --init")
    p.add_argument("--base", type=Path, help="base directory for --init from-base")
    p.add_argument("--layers", type=int, help="student layers for --init (default: half the teacher's)")
    p.add_argument("--hidden", type=int, help="student hidden size for --init (default: the teacher's)")
    p.add_argument("--data", default="demo", help="dataset spec: massive:PATH, tsm:PATH, file:PATH, or demo (default)")
    p.add_argument("--split", choices=("train", "dev", "test"), help="split to score (default: test, else dev)")
    p.add_argument("--langs", default="all", help="languages: all | seen | unseen | english | comma list (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default: 64)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example incl. <s> </s> (default: 128)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="bf16 autocast where this hardware runs it faster (auto, as train), or fp32 / bf16 (default: auto)")
    p.add_argument("--bf16", action="store_true", help="the same as --precision bf16")
    p.add_argument("--json", type=Path, help="also write the scores to this JSON file")
    p.add_argument("--cache-dir", type=Path, help="cache for tokenized data and the demo (default: ~/.cache/xlmr_mini)")
    return p


def _model_from_args(args, device) -> tuple[XLMRClassifier, Path | None, str]:
    """(model, its tokenizer.json if any, a description)."""
    if (args.model is None) == (args.init is None):
        raise InputError("give exactly one of --model DIR or --init (with --teacher/--base)")
    if args.model is not None:
        return load_model(check_model_dir(args.model, "--model"), device=device).eval(), find_tokenizer(args.model), \
            str(args.model)
    source = args.teacher if args.teacher is not None else args.base
    if source is None:
        raise InputError("--init: give --teacher DIR (or --base DIR for from-base)")
    from xlmr_mini.config import XLMRConfig

    layers = args.layers or max(1, XLMRConfig.from_hf(source).num_hidden_layers // 2)
    spec = StudentSpec(layers=layers, hidden=args.hidden)
    cfg, sd = init_student(args.init, spec, teacher=args.teacher, base=args.base, seed=0)
    tok = next((t for t in (find_tokenizer(d) for d in (args.teacher, args.base) if d is not None) if t), None)
    return build_model(cfg, sd, device=device).eval(), tok, f"{args.init} student ({layers} layers, untrained) of {source}"


def _check_args(args) -> None:
    """What the flags alone must satisfy, checked before any work."""
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be at least 1")
    check_max_length(args.max_length)
    for flag in ("teacher", "base"):
        if getattr(args, flag) is not None:
            check_model_dir(getattr(args, flag), f"--{flag}")
    if args.json is not None:
        check_output_file(args.json, "--json")
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir, "--cache-dir")


@cli_main
def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    _check_args(args)
    device = resolve_device(args.device)
    model, tok_file, what = _model_from_args(args, device)
    check_max_length(args.max_length, model.cfg)
    task = load_task(args.data, cache_dir=args.cache_dir)
    tok_file = tok_file or task.tokenizer_path
    if tok_file is None:
        raise InputError(f"{what}: no tokenizer.json beside the model, and the data brings none")
    tokenizer = Tokenizer(tok_file)
    check_tokenizer(tokenizer.vocab_size, tok_file, model.cfg, what)
    split_name, note = final_split(task, args.split)
    split = select_languages(task.splits[split_name], args.langs, task)
    split = to_model_labels(split, label_ids(task.labels, model.cfg.id2label, what))
    enc = encode_split(split, tokenizer, args.max_length, cache_dir=args.cache_dir)
    precision = resolve_precision("bf16" if args.bf16 else args.precision, device, model.cfg.hidden_size,
                                  args.cache_dir or default_cache_dir())
    scores = evaluate(model, enc, args.batch_size, task.unseen, precision == "bf16", unk_id=tokenizer.unk_id)
    title = f"{split_name} split of {task.source}: micro-F1 and macro-F1 per language ({what}; {precision})"
    print(format_table(scores, task.unseen, title))
    if note:
        print(f"note: {note}")
    if args.json is not None:
        record = {"model": what, "data": args.data, "split": split_name, "precision": precision,
                  "metrics": ["micro_f1", "macro_f1"], **scores}
        atomic_write(args.json, json.dumps(record, indent=1) + "\n")
    o = scores["overall"]
    print(f"{split_name}: micro-F1 {100 * o['micro_f1']:.2f}%, macro-F1 {100 * o['macro_f1']:.2f}% on {o['n']} examples, "
          f"{len(scores['languages'])} languages" + ("" if o.get("unk_rate") is None else
                                                      f"; <unk> {100 * o['unk_rate']:.2f}% of the pieces"))
    return scores


if __name__ == "__main__":
    main()
