"""Classification scores: macro-F1 and accuracy, overall, per language, per language partition.

Macro-F1 follows scikit-learn's `f1_score(average="macro")`: the unweighted mean of per-class F1
over the classes that occur in the gold labels or the predictions of the examples scored (a class
absent from both says nothing about the model and is left out); a class with no true positive
scores 0. Scores are fractions in [0, 1]; tables print them as percentages like the paper.

The partition rows ("seen", "unseen") score the pooled examples of those languages, as if they
were one test set (the paper's "Test Data: unseen lang").
"""
import numpy as np


def macro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in `gold` or `pred`; 0.0 for no examples."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    if gold.size == 0:
        return 0.0
    classes = np.union1d(gold, pred)
    tp = np.array([np.sum((gold == c) & (pred == c)) for c in classes], dtype=np.float64)
    n_gold = np.array([np.sum(gold == c) for c in classes], dtype=np.float64)
    n_pred = np.array([np.sum(pred == c) for c in classes], dtype=np.float64)
    f1 = np.divide(2 * tp, n_gold + n_pred, out=np.zeros_like(tp), where=(n_gold + n_pred) > 0)
    return float(f1.mean())


def accuracy(gold: np.ndarray, pred: np.ndarray) -> float:
    gold, pred = np.asarray(gold), np.asarray(pred)
    return float(np.mean(gold == pred)) if gold.size else 0.0


def _row(gold: np.ndarray, pred: np.ndarray) -> dict:
    return {"macro_f1": macro_f1(gold, pred), "accuracy": accuracy(gold, pred), "n": int(gold.size)}


def score_by_language(gold, pred, langs, unseen: frozenset[str] = frozenset()) -> dict:
    """{"overall": row, "languages": {lang: row}, "seen": row, "unseen": row}, a row being
    {"macro_f1", "accuracy", "n"}; "seen"/"unseen" only when some scored language falls in them."""
    gold, pred, langs = np.asarray(gold), np.asarray(pred), np.asarray(langs, dtype=object)
    scores = {"overall": _row(gold, pred), "languages": {}}
    for lang in sorted(set(langs.tolist())):
        keep = langs == lang
        scores["languages"][lang] = _row(gold[keep], pred[keep])
    is_unseen = np.array([lang in unseen for lang in langs], dtype=bool)
    for name, keep in (("seen", ~is_unseen), ("unseen", is_unseen)):
        if keep.any():
            scores[name] = _row(gold[keep], pred[keep])
    return scores


def format_table(scores: dict, unseen: frozenset[str] = frozenset(), title: str = "") -> str:
    """A fixed-width table, one row per language, then the partitions and the overall row."""
    langs = list(scores["languages"])
    width = max([len(x) for x in langs] + [len("unseen (pooled)"), len("language")])
    head = f"{'language':<{width}}  {'macro-F1':>8}  {'accuracy':>8}  {'n':>6}"
    lines = ([title] if title else []) + [head, "-" * len(head)]

    def line(name, row):
        return f"{name:<{width}}  {100 * row['macro_f1']:>7.2f}%  {100 * row['accuracy']:>7.2f}%  {row['n']:>6}"

    for lang in langs:
        lines.append(line(lang + (" *" if lang in unseen else ""), scores["languages"][lang]))
    lines.append("-" * len(head))
    for part in ("seen", "unseen"):
        if part in scores and unseen:
            lines.append(line(f"{part} (pooled)", scores[part]))
    lines.append(line("overall", scores["overall"]))
    if unseen and any(lang in unseen for lang in langs):
        lines.append("* unseen language (held out in the paper's zero-shot setup)")
    return "\n".join(lines)


def summarize_seeds(values: list[float]) -> dict:
    """Mean and spread of one score over seeds: {"mean", "std" (sample, ddof=1), "min", "max", "n"}."""
    v = np.asarray(values, dtype=np.float64)
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}
