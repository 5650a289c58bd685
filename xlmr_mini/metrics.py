"""Classification scores: micro-F1 and macro-F1, overall, per language, per language partition.

Micro-F1 is the paper's "F1": for single-label classification it equals accuracy (its Table 5
"random score", every prediction the majority class, is that predictor's accuracy: 7% on
massive, 33.33% on tsm). Macro-F1 is reported beside it.

Macro-F1 follows scikit-learn's `f1_score(average="macro")`: the unweighted mean of per-class F1
over the classes that occur in the gold labels or the predictions of the examples scored (a class
absent from both says nothing about the model and is left out); a class with no true positive
scores 0. Scores are fractions in [0, 1]; tables print them as percentages like the paper.

The partition rows score the pooled examples of those languages as one test set ("seen",
"unseen": the paper's "Test Data: unseen lang"), and beside them the unweighted mean of the
per-language scores ("seen_mean", "unseen_mean"); with equal-sized languages, as in MASSIVE, the
two micro-F1s agree.
"""
import numpy as np

METRICS = ("micro-f1", "macro-f1")  # --metric choices; the key in a score row is metric_key(name)
METRIC_LABEL = {"micro_f1": "micro-F1", "macro_f1": "macro-F1"}


def metric_key(name: str) -> str:
    """'micro-f1' -> 'micro_f1' (the key in a score row)."""
    return name.replace("-", "_")


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


def micro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    """Micro-averaged F1 of single-label predictions, which is their accuracy; 0.0 for no examples."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    return float(np.mean(gold == pred)) if gold.size else 0.0


def _row(gold: np.ndarray, pred: np.ndarray) -> dict:
    return {"micro_f1": micro_f1(gold, pred), "macro_f1": macro_f1(gold, pred), "n": int(gold.size)}


def _mean_row(rows: list[dict]) -> dict:
    return {"micro_f1": float(np.mean([r["micro_f1"] for r in rows])),
            "macro_f1": float(np.mean([r["macro_f1"] for r in rows])), "languages": len(rows)}


def score_by_language(gold, pred, langs, unseen: frozenset[str] = frozenset()) -> dict:
    """{"overall": row, "languages": {lang: row}, "seen": row, "seen_mean": mean row, "unseen": ...},
    a row being {"micro_f1", "macro_f1", "n"} and a mean row {"micro_f1", "macro_f1", "languages"};
    the partitions only when some scored language falls in them."""
    gold, pred, langs = np.asarray(gold), np.asarray(pred), np.asarray(langs, dtype=object)
    scores = {"overall": _row(gold, pred), "languages": {}}
    for lang in sorted(set(langs.tolist())):
        keep = langs == lang
        scores["languages"][lang] = _row(gold[keep], pred[keep])
    is_unseen = np.array([lang in unseen for lang in langs], dtype=bool)
    for name, keep in (("seen", ~is_unseen), ("unseen", is_unseen)):
        if keep.any():
            scores[name] = _row(gold[keep], pred[keep])
            in_part = [lang for lang in scores["languages"] if (lang in unseen) == (name == "unseen")]
            scores[f"{name}_mean"] = _mean_row([scores["languages"][lang] for lang in in_part])
    return scores


def mean_over_seeds(all_scores: list[dict]) -> dict:
    """The mean of several seeds' `score_by_language` results, entry by entry."""
    def mean(rows):
        return {k: (rows[0][k] if k in ("n", "languages") else float(np.mean([r[k] for r in rows])))
                for k in rows[0]}

    first = all_scores[0]
    out = {name: mean([s[name] for s in all_scores]) for name in first if name != "languages"}
    out["languages"] = {lang: mean([s["languages"][lang] for s in all_scores]) for lang in first["languages"]}
    return {name: out[name] for name in first}


def format_table(scores: dict, unseen: frozenset[str] = frozenset(), title: str = "") -> str:
    """A fixed-width table, one row per language, then the partitions (pooled and mean of
    languages) and the overall row; micro-F1 (the paper's F1, = accuracy) and macro-F1."""
    langs = list(scores["languages"])
    width = max([len(x) for x in langs] + [len("unseen (mean of 99 langs)"), len("language")])
    head = f"{'language':<{width}}  {'micro-F1':>8}  {'macro-F1':>8}  {'n':>6}" + (
        f"  {'<unk>':>7}" if "unk_rate" in scores["overall"] else "")
    lines = ([title] if title else []) + [head, "-" * len(head)]

    def line(name, row):
        n = row["n"] if "n" in row else ""
        unk = f"  {100 * row['unk_rate']:>6.2f}%" if "unk_rate" in row else ""
        return f"{name:<{width}}  {100 * row['micro_f1']:>7.2f}%  {100 * row['macro_f1']:>7.2f}%  {n:>6}{unk}"

    for lang in langs:
        lines.append(line(lang + (" *" if lang in unseen else ""), scores["languages"][lang]))
    lines.append("-" * len(head))
    for part in ("seen", "unseen"):
        if part in scores and unseen:
            lines.append(line(f"{part} (pooled)", scores[part]))
            lines.append(line(f"{part} (mean of {scores[part + '_mean']['languages']} langs)", scores[part + "_mean"]))
    lines.append(line("overall", scores["overall"]))
    lines.append("micro-F1 is the paper's F1 (= accuracy for single-label classification)")
    if unseen and any(lang in unseen for lang in langs):
        lines.append("* unseen language (held out in the paper's zero-shot setup)")
    return "\n".join(lines)


def summarize_seeds(values: list[float]) -> dict:
    """Mean and spread of one score over seeds: {"mean", "std" (sample, ddof=1), "min", "max", "n"}."""
    v = np.asarray(values, dtype=np.float64)
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}
