"""Score a classifier on an encoded split: predictions in the split's order, per-language scores,
the label mapping between a dataset and a model, and which split a run reports.

Library layer: used by `train` (dev evaluation, the final score) and by `evaluate` (the CLI).
Scores are defined in `xlmr_mini.metrics`. Under torchrun each rank scores every world-th batch
and every rank gets all the predictions.
"""
import numpy as np
import torch

from xlmr_mini import distributed
from xlmr_mini.data import Split, TaskData, epoch_batches
from xlmr_mini.errors import InputError
from xlmr_mini.metrics import score_by_language
from xlmr_mini.model import XLMRClassifier
from xlmr_mini.vocab import unk_rates


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
def predict_logits(model: XLMRClassifier, enc, batch_size: int = 64, bf16: bool = False, progress=None) -> np.ndarray:
    """float32 logits [N, labels], in the split's order (batches run shortest first, then map back;
    under torchrun sharded over the ranks and gathered). `progress.update(batches done)` if given."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = np.zeros((len(enc), model.cfg.num_labels), dtype=np.float32)
    batches = epoch_batches(enc, batch_size, seed=0, epoch=0, shuffle=False,
                            pad_id=model.cfg.pad_token_id, sort_by_length=True)
    mine = []
    for step, batch in enumerate(batches[distributed.rank()::distributed.world_size()], 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).logits
        mine.append((batch["index"].numpy(), out.float().cpu().numpy()))
        if progress is not None:
            progress.update(step)
    for index, part in (part for rank_parts in distributed.all_gather(mine) for part in rank_parts):
        logits[index] = part
    model.train(was_training)
    return logits


def predict(model: XLMRClassifier, enc, batch_size: int = 64, bf16: bool = False) -> np.ndarray:
    """Predicted label ids, in the split's order (see `predict_logits`)."""
    return predict_logits(model, enc, batch_size, bf16).argmax(-1)


def evaluate(model: XLMRClassifier, enc, batch_size: int = 64, unseen: frozenset[str] = frozenset(),
             bf16: bool = False, unk_id: int | None = None) -> dict:
    """Per-language, partition and overall micro- and macro-F1 of `model` on an encoded split
    (labels already in the model's numbering); see `metrics.score_by_language`. With `unk_id`,
    the overall and per-language rows also give `unk_rate`, the share of <unk> among the pieces
    (a trimmed tokenizer maps pieces it lacks to smaller ones or <unk>)."""
    preds = predict(model, enc, batch_size, bf16)
    scores = score_by_language(enc.labels, preds, enc.langs, unseen)
    if unk_id is not None:
        overall, per_language = unk_rates(enc, unk_id)
        scores["overall"]["unk_rate"] = overall
        for lang, rate in per_language.items():
            scores["languages"][lang]["unk_rate"] = rate
    return scores


def final_split(task: TaskData, wanted: str | None = None) -> tuple[str, str]:
    """(split name, note): `wanted`, else test if the data has one, else dev with a note."""
    if wanted is not None:
        if wanted not in task.splits:
            raise InputError(f"--split {wanted}: the data has no {wanted} split (it has {', '.join(task.splits)})")
        return wanted, ""
    if "test" in task.splits:
        return "test", ""
    if "dev" in task.splits:
        return "dev", (f"{task.source} has no test split: the scores are on dev, the split that also selected "
                       f"the checkpoint, so they are optimistic")
    raise InputError(f"{task.source}: the data has neither a test nor a dev split to evaluate")
