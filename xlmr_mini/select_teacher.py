"""Pick the teacher the students learn from: the best of several finished teacher runs.

    python -m xlmr_mini.select_teacher runs/teacher-seed1 runs/teacher-seed2 runs/teacher-seed3 --out runs/teacher

The paper trains every model with three seeds "except for the teacher model, where we selected one
of the best models for the distillation process" (§3.1). Each run's `dev_score` is its best
checkpoint's score on the dev split of its training languages (what selected that checkpoint);
the highest wins, ties going to the run listed first. `--out` receives `best`, a link to the
winner's `best/` (so `--teacher OUT/best` is a stable path before the winner is known), and
`selection.json`: the winner and every candidate's seed, dev score and reported scores.
"""
import json
import os
from pathlib import Path

from xlmr_mini.errors import InputError, OneLineErrorParser, cli_main
from xlmr_mini.files import atomic_write


def candidate(run_dir: Path) -> dict:
    """One finished teacher run's seed and scores, from its results.json."""
    path = run_dir / "results.json"
    if not path.is_file() or not (run_dir / "best").is_dir():
        raise InputError(f"{run_dir}: not a finished training run (no results.json and best/)")
    r = json.loads(path.read_text(encoding="utf-8"))
    if "dev_score" not in r or "seed" not in r:
        raise InputError(f"{path}: a one-seed run's results (seed, dev_score) expected")
    return {"run": run_dir.name, "seed": r["seed"], "dev_score": r["dev_score"], "metric": r.get("metric"),
            "selection_languages": r.get("selection_languages"), "reported_split": r.get("reported_split"),
            "final": r["final"]["overall"]}


def select_teacher(run_dirs: list[Path], out: Path) -> dict:
    """Link the best run's best/ as `out/best` and write `out/selection.json`; returns the selection."""
    candidates = [candidate(Path(d)) for d in run_dirs]
    chosen = max(range(len(candidates)), key=lambda i: (candidates[i]["dev_score"], -i))
    out.mkdir(parents=True, exist_ok=True)
    link, tmp = out / "best", out / ".best.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(Path(run_dirs[chosen]).resolve() / "best", out.resolve()), tmp)
    os.replace(tmp, link)
    selection = {"selected": candidates[chosen], "candidates": candidates}
    atomic_write(out / "selection.json", json.dumps(selection, indent=1) + "\n")
    return selection


@cli_main
def main(argv=None) -> dict:
    p = OneLineErrorParser(prog="python -m xlmr_mini.select_teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="finished teacher run directories (one seed each)")
    p.add_argument("--out", type=Path, required=True, help="where best (a link) and selection.json go")
    args = p.parse_args(argv)
    selection = select_teacher(args.runs, args.out)
    s = selection["selected"]
    print(f"selected {s['run']} (seed {s['seed']}, dev {s['metric']} {100 * s['dev_score']:.2f}%) of "
          f"{len(selection['candidates'])} teachers; wrote {args.out}")
    return selection


if __name__ == "__main__":
    main()
