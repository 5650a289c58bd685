"""Results of a run: one seed's results.json (its best model scored on the final split), the
mean and spread over seeds, and what is printed at the end (the per-language table, one line).
"""
import dataclasses
import json
from pathlib import Path

from xlmr_mini import distributed
from xlmr_mini.checkpoint import load_model
from xlmr_mini.inference import evaluate
from xlmr_mini.metrics import METRIC_LABEL, format_table, mean_over_seeds, metric_key, summarize_seeds
from xlmr_mini.run_dir import write_json
from xlmr_mini.run_setup import Setup
from xlmr_mini.train_config import TrainConfig


def selection(cfg: TrainConfig, setup: Setup) -> dict:
    """How the checkpoint was chosen and which split is reported (results.json records both)."""
    return {"metric": cfg.metric, "select_on": cfg.select_on, "selection_languages": list(setup.select_langs),
            "reported_split": setup.final_name, "note": setup.final_note}


def finish_seed(cfg: TrainConfig, setup: Setup, seed: int, out: Path, device, prog, wall_s: float,
                precision: str, step_impl: dict) -> dict:
    """Score the best model on the final split; results.json. `step_impl`: how the step ran
    (`StepPlan.record`: kd_impl and compile, asked and used)."""
    best = load_model(out / "best", device=device)
    final_split, unk_id = setup.splits["final"], setup.tokenizer.unk_id
    if setup.vocab is not None and best.cfg.vocab_size != setup.vocab.size:  # saved with the full vocabulary
        final_split = setup.vocab.to_full(final_split)
    elif setup.vocab is not None and unk_id is not None:
        unk_id = int(setup.vocab.old_to_new[unk_id])
    final = evaluate(best, final_split, cfg.eval_batch_size, setup.task.unseen, precision == "bf16", unk_id=unk_id)
    results = {
        "seed": seed, "best_step": prog.best_step, "steps": prog.step, "dev_score": prog.best_score,
        **selection(cfg, setup), "final": final,
        "student": {"layers": best.cfg.num_hidden_layers, "hidden": best.cfg.hidden_size,
                    "heads": best.cfg.num_attention_heads,
                    "parameters": sum(p.numel() for p in best.parameters()),
                    "vocab": best.cfg.vocab_size},
        "trained_vocab": setup.vocab.size if setup.vocab is not None else None, "precision": precision, **step_impl,
        "teacher": str(setup.teacher_dir) if setup.teacher_dir else None,
        "wall_s": round(wall_s, 1), "config": dataclasses.asdict(cfg),
    }
    distributed.on_main(_write_final, out, {"type": "eval", "split": setup.final_name, "final": True,
                                            "step": prog.best_step, **final}, results)
    return results


def _write_final(out: Path, record: dict, results: dict) -> None:
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    write_json(out / "results.json", results)


def report(cfg: TrainConfig, setup: Setup, out: Path, runs: list[dict], quiet: bool) -> dict:
    result = runs[0] if len(runs) == 1 else _summarize(cfg, setup, out, runs)
    if quiet:
        return result
    title = (f"{_split_label(setup)}, best-on-dev model: micro-F1 and macro-F1 per language"
             + (f" (seed {runs[0]['seed']})" if len(runs) == 1 else f" (mean of {len(runs)} seeds)"))
    print(format_table(result["final"], setup.task.unseen, title))
    if setup.final_note:
        print(f"note: {setup.final_note}")
    print(_summary_line(cfg, setup, out, runs, result))
    return result


def _split_label(setup: Setup) -> str:
    return f"{setup.final_name} split" + (" (no test split: the split that selected the checkpoint)"
                                          if setup.final_name == "dev" else "")


def best_seed(runs: list[dict]) -> int:
    """The seed with the best dev score (the first of equals): its model is the run's best/."""
    return max(runs, key=lambda r: r["dev_score"])["seed"]


def _summarize(cfg: TrainConfig, setup: Setup, out: Path, runs: list[dict]) -> dict:
    """Mean over seeds of every score, spread of the overall ones; written to out/results.json."""
    summary = {
        "seeds": [r["seed"] for r in runs], "best_seed": best_seed(runs), **selection(cfg, setup),
        "dev_score": summarize_seeds([r["dev_score"] for r in runs]),
        "final_micro_f1": summarize_seeds([r["final"]["overall"]["micro_f1"] for r in runs]),
        "final_macro_f1": summarize_seeds([r["final"]["overall"]["macro_f1"] for r in runs]),
        "final": mean_over_seeds([r["final"] for r in runs]), "runs": [f"seed-{r['seed']}" for r in runs],
        "precision": sorted({r.get("precision", "fp32") for r in runs}),
        "config": dataclasses.asdict(cfg),
    }
    distributed.on_main(write_json, out / "results.json", summary)
    return summary


def _summary_line(cfg: TrainConfig, setup: Setup, out: Path, runs: list[dict], result: dict) -> str:
    name, metric = setup.final_name, METRIC_LABEL[metric_key(cfg.metric)]
    on = "all dev languages" if cfg.select_on == "all" else f"dev of {len(setup.select_langs)} training languages"
    what = f"{cfg.init}{'' if cfg.no_kd else ' + KD'}"
    if len(runs) == 1:
        r, o = result, result["final"]["overall"]
        return (f"{what}, {r['student']['layers']} layers x {r['student']['hidden']}: best {metric} on {on} "
                f"{100 * r['dev_score']:.2f}% at step {r['best_step']}/{r['steps']}; {name} micro-F1 "
                f"{100 * o['micro_f1']:.2f}%, macro-F1 {100 * o['macro_f1']:.2f}%{_unseen(r['final'])}; "
                f"{r.get('precision', 'fp32')}; {r['wall_s']:.0f}s; wrote {out}")
    s = result
    return (f"{what}, {len(runs)} seeds: {name} micro-F1 {100 * s['final_micro_f1']['mean']:.2f}% "
            f"+- {100 * s['final_micro_f1']['std']:.2f}, macro-F1 {100 * s['final_macro_f1']['mean']:.2f}% "
            f"+- {100 * s['final_macro_f1']['std']:.2f}{_unseen(s['final'])}; best {metric} on {on} "
            f"{100 * s['dev_score']['mean']:.2f}% +- {100 * s['dev_score']['std']:.2f}; {'/'.join(s['precision'])}; "
            f"best on dev: seed {s['best_seed']}, its model in {out / 'best'}; wrote {out}")


def _unseen(scores: dict) -> str:
    if "unseen" not in scores:
        return ""
    return f" (unseen pooled micro-F1 {100 * scores['unseen']['micro_f1']:.2f}%)"
