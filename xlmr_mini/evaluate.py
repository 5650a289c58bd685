"""Evaluate a classifier per language: macro-F1 and accuracy, seen/unseen partitions, a table.

    python -m xlmr_mini.evaluate --model runs/demo/best --data demo
    python -m xlmr_mini.evaluate --init from-teacher --teacher DIR --layers 6 --data tsm:PATH

The second form copies a student from the teacher and evaluates it with no training at all (the
paper's Table 5, "without finetune"). Scores are defined in `xlmr_mini.metrics`.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from xlmr_mini.checkpoint import build_model, find_tokenizer, load_model
from xlmr_mini.copy_weights import INITS, StudentSpec, init_student
from xlmr_mini.data import Split, TaskData, encode_split, epoch_batches, load_task, select_languages
from xlmr_mini.errors import InputError, cli_main
from xlmr_mini.metrics import format_table, score_by_language
from xlmr_mini.model import XLMRClassifier
from xlmr_mini.tokenizer import Tokenizer


def label_ids(task_labels: tuple[str, ...], model_labels: tuple[str, ...], where: str) -> np.ndarray:
    """For each task label id, the model's id of the same name; every task label must be known."""
    unknown = [name for name in task_labels if name not in model_labels]
    if unknown:
        raise InputError(
            f"{where}: the data's label(s) {', '.join(map(repr, unknown[:5]))} are not among the model's "
            f"{len(model_labels)} labels ({', '.join(model_labels[:8])}{', ...' if len(model_labels) > 8 else ''})"
        )
    return np.array([model_labels.index(name) for name in task_labels], dtype=np.int64)


def to_model_labels(split: Split, remap: np.ndarray) -> Split:
    """The split with label ids in the model's numbering."""
    return Split(texts=split.texts, labels=remap[split.labels], langs=split.langs)


@torch.no_grad()
def predict(model: XLMRClassifier, enc, batch_size: int = 64, bf16: bool = False) -> np.ndarray:
    """Predicted label ids, in the split's order (batches run shortest first, then map back)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds = np.zeros(len(enc), dtype=np.int64)
    batches = epoch_batches(enc, batch_size, seed=0, epoch=0, shuffle=False,
                            pad_id=model.cfg.pad_token_id, sort_by_length=True)
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).logits
        preds[batch["index"].numpy()] = logits.argmax(-1).cpu().numpy()
    model.train(was_training)
    return preds


def evaluate(model: XLMRClassifier, enc, batch_size: int = 64, unseen: frozenset[str] = frozenset(),
             bf16: bool = False) -> dict:
    """Per-language and overall macro-F1 and accuracy of `model` on an encoded split
    (labels already in the model's numbering); see `metrics.score_by_language`."""
    preds = predict(model, enc, batch_size, bf16)
    return score_by_language(enc.labels, preds, enc.langs, unseen)


def final_split(task: TaskData, wanted: str | None = None) -> tuple[str, str]:
    """(split name, note): `wanted`, else test if the data has one, else dev with a note."""
    if wanted is not None:
        if wanted not in task.splits:
            raise InputError(f"--split {wanted}: the data has no {wanted} split (it has {', '.join(task.splits)})")
        return wanted, ""
    if "test" in task.splits:
        return "test", ""
    if "dev" in task.splits:
        return "dev", "no test split found; reporting the dev split"
    raise InputError(f"{task.source}: the data has neither a test nor a dev split to evaluate")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2 like every other bad input."""

    def error(self, message):
        raise InputError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m xlmr_mini.evaluate",
        description="Macro-F1 and accuracy of an XLM-R classifier, overall, per language and on the paper's "
        "seen/unseen language partitions. Either --model DIR (a saved HF directory), or --init from-teacher "
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
    p.add_argument("--bf16", action="store_true", help="run under bfloat16 autocast")
    p.add_argument("--json", type=Path, help="also write the scores to this JSON file")
    p.add_argument("--cache-dir", type=Path, help="cache for tokenized data and the demo (default: ~/.cache/xlmr_mini)")
    return p


def _model_from_args(args, device) -> tuple[XLMRClassifier, Path | None, str]:
    """(model, its tokenizer.json if any, a description)."""
    if (args.model is None) == (args.init is None):
        raise InputError("give exactly one of --model DIR or --init (with --teacher/--base)")
    if args.model is not None:
        return load_model(args.model, device=device).eval(), find_tokenizer(args.model), str(args.model)
    source = args.teacher if args.teacher is not None else args.base
    if source is None:
        raise InputError("--init: give --teacher DIR (or --base DIR for from-base)")
    from xlmr_mini.config import XLMRConfig

    layers = args.layers or max(1, XLMRConfig.from_hf(source).num_hidden_layers // 2)
    spec = StudentSpec(layers=layers, hidden=args.hidden)
    cfg, sd = init_student(args.init, spec, teacher=args.teacher, base=args.base, seed=0)
    tok = next((t for t in (find_tokenizer(d) for d in (args.teacher, args.base) if d is not None) if t), None)
    return build_model(cfg, sd, device=device).eval(), tok, f"{args.init} student ({layers} layers, untrained) of {source}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


@cli_main
def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    model, tok_file, what = _model_from_args(args, device)
    task = load_task(args.data, cache_dir=args.cache_dir)
    tok_file = tok_file or task.tokenizer_path
    if tok_file is None:
        raise InputError(f"{what}: no tokenizer.json beside the model, and the data brings none")
    split_name, note = final_split(task, args.split)
    split = select_languages(task.splits[split_name], args.langs, task)
    split = to_model_labels(split, label_ids(task.labels, model.cfg.id2label, what))
    enc = encode_split(split, Tokenizer(tok_file), args.max_length, cache_dir=args.cache_dir)
    scores = evaluate(model, enc, args.batch_size, task.unseen, args.bf16)
    title = f"{split_name} split of {task.source}: macro-F1 and accuracy per language ({what})"
    print(format_table(scores, task.unseen, title))
    if note:
        print(note)
    if args.json is not None:
        args.json.write_text(json.dumps({"model": what, "data": args.data, "split": split_name, **scores}, indent=1) + "\n")
    o = scores["overall"]
    print(f"{split_name}: macro-F1 {100 * o['macro_f1']:.2f}%, accuracy {100 * o['accuracy']:.2f}% on {o['n']} examples, "
          f"{len(scores['languages'])} languages")
    return scores


if __name__ == "__main__":
    main()
