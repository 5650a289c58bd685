"""The study's outputs: per plan a Markdown table in the paper's layout (`PLAN.md`, micro-F1 then
macro-F1, mean ± std over seeds, the paper's published number beside ours) and one CSV row per
run and seed (`PLAN.csv`); Figures 2 and 3 as PNG when matplotlib is installed.

Scores come from each run's results.json (the best-on-dev checkpoint on the reported split:
test, else dev, which the tables then say). Tables 3 and 4 score the unseen languages, pooled.
A teacher row holds the selected teacher; every table lists all teacher seeds' scores. PLAN.md
also says which languages and how many examples each partition actually had, and warns when the
data lacks languages of the paper's partition or its test split.
"""
import csv
import io
import json
from pathlib import Path

import numpy as np

from xlmr_mini.copy_weights import INITS
from xlmr_mini.data import TaskData, resolve_languages
from xlmr_mini.data.partitions import KNOWN_LANGUAGES, UNSEEN
from xlmr_mini.files import atomic_write
from xlmr_mini.inference import final_split
from xlmr_mini.metrics import macro_f1, micro_f1
from xlmr_mini.study_plan import PAPER, SUBSETS, Planner, Run

METRICS = (("micro_f1", "micro-F1 (the paper's F1)"), ("macro_f1", "macro-F1"))
# Each plan's training languages and the languages its scores pool (the paper's partitions).
TRAIN_LANGS = {"table2": ("all",), "table3": ("seen", "english"), "table4": ("english",), "table5": ("all",),
               "figure2": ("all",), "figure3": ("all",)}
SCORED_LANGS = {"table3": "unseen", "table4": "unseen"}
# Figure 3 plots the training loss as means over windows of this many steps (transformers'
# logging_steps: 500); the demo's runs are a few hundred steps long.
LOSS_WINDOW = {"demo": 10}
PAPER_LOSS_WINDOW = 500
CSV_FIELDS = ("plan", "row", "column", "seed", "micro_f1", "macro_f1", "scored_on", "reported_split", "run", "settings")


class _Any:
    """Flag value wildcard: the flag is present with any value."""


_any = _Any()


class Results:
    """Scores of finished runs, looked up by the run's flags."""

    def __init__(self, runs: dict[str, Run], planner: Planner):
        self.planner, self.runs = planner, list(runs.values())
        self._loaded: dict[str, dict | None] = {}  # tables and figures share runs: read each file once
        self._losses: dict[tuple[str, int], np.ndarray] = {}

    def load(self, run: Run) -> dict | None:
        if run.key not in self._loaded:
            path = self.planner.path(run) / run.result_file
            self._loaded[run.key] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        return self._loaded[run.key]

    def loss_windows(self, run: Run, window: int) -> np.ndarray:
        """The run's training loss, mean over each window of `window` steps (by the records'
        `step`, so per-step and already-averaged records both work); metrics.jsonl read once."""
        key = (run.key, window)
        if key not in self._losses:
            sums: dict[int, list[float]] = {}
            with open(self.planner.path(run) / "metrics.jsonl", encoding="utf-8") as f:
                for line in f:
                    if '"train"' in line and (r := json.loads(line)).get("type") == "train":
                        acc = sums.setdefault((r["step"] - 1) // window, [0.0, 0])
                        acc[0] += r["loss"]
                        acc[1] += 1
            self._losses[key] = np.array([sums[w][0] / sums[w][1] for w in sorted(sums)])
        return self._losses[key]

    def selection(self, plan: str) -> dict | None:
        """The plan's teacher selection (select_teacher's selection.json), None until it ran."""
        runs = [r for r in self.runs if plan in r.plans and r.tool == "select_teacher"]
        return self.load(runs[0]) if runs else None

    def selected_teacher(self, plan: str) -> list[tuple[Run, dict]]:
        """[(run, results)] of the teacher the plan's students learned from ([] until known)."""
        chosen = self.selection(plan)
        if chosen is None:
            return []
        runs = [r for r in self.runs if r.dir_name == chosen["selected"]["run"]]
        return [(r, res) for r in runs if (res := self.load(r)) is not None]

    def find(self, plan: str, tool: str = "train", **flags) -> list[Run]:
        """The `tool` runs of `plan` whose argv holds every flag=value given (None: flag absent)."""
        def has(run, flag, value):
            argv = run.argv
            if value is None:
                return f"--{flag}" not in argv
            if value is True or isinstance(value, _Any):
                return f"--{flag}" in argv
            return f"--{flag}" in argv and argv[argv.index(f"--{flag}") + 1] == str(value)

        return [r for r in self.runs if plan in r.plans and r.tool == tool
                and all(has(r, f.replace("_", "-"), v) for f, v in flags.items())]


def _score(result: dict, part: str, metric: str) -> float | None:
    scores = result.get("final", result)
    row = scores.get(part) if part != "overall" else scores["overall"]
    return None if row is None else row[metric]


def _cell(values: list[float], single: bool = False) -> str:
    """Mean ± std over seeds; `single` rows (a selected teacher, a deterministic evaluation) hold
    one model by design and show its number alone."""
    if not values:
        return "—"
    v = 100 * np.asarray(values)
    return f"{v.mean():.2f}" + (f" ± {v.std(ddof=1):.2f}" if v.size > 1 else "" if single else " (1 seed)")


class Table:
    """Rows x columns of seed lists, rendered per metric, plus CSV records; `add_value` rows hold
    a number computed from the data (no runs), one per metric."""

    def __init__(self, plan: str, title: str, columns: list[str], part: str):
        self.plan, self.title, self.columns, self.part = plan, title, columns, part
        self.rows: list[tuple[str, dict[str, list[tuple[Run, dict]]], dict[str, float | None], bool]] = []
        self.value_rows: list[tuple[str, dict[str, dict[str, float]], dict[str, float | None]]] = []
        self.notes: list[str] = []  # lines under the table

    def add(self, label: str, cells: dict[str, list[tuple[Run, dict]]], paper: dict[str, float | None],
            single: bool = False):
        self.rows.append((label, cells, paper, single))

    def add_value(self, label: str, values: dict[str, dict[str, float]], paper: dict[str, float | None]):
        """values: column -> {metric: fraction}."""
        self.value_rows.append((label, values, paper))

    def markdown(self, metric: str, metric_name: str, dataset_known: bool) -> str:
        head = ["row"] + [f"{c} (ours)" for c in self.columns]
        head += [f"{c} (paper)" for c in self.columns] if dataset_known else []
        lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
        for label, cells, paper, single in self.rows:
            ours = [_cell([v for _, r in cells.get(c, []) if (v := _score(r, self.part, metric)) is not None], single)
                    for c in self.columns]
            lines.append(self._line(label, ours, paper, dataset_known, metric))
        for label, values, paper in self.value_rows:
            ours = [f"{100 * values[c][metric]:.2f}" if c in values else "—" for c in self.columns]
            lines.append(self._line(label, ours, paper, dataset_known, metric))
        return "\n".join([f"{metric_name}:", ""] + lines)

    def _line(self, label, ours, paper, dataset_known, metric) -> str:
        ref = [f"{paper[c]:.2f}" if paper.get(c) is not None and metric == "micro_f1" else "—" for c in self.columns]
        return f"| {' | '.join([label] + ours + (ref if dataset_known else []))} |"

    def records(self, reported_split: str) -> list[dict]:
        """One CSV record per run and seed; a value row (computed from the data) has no run."""
        out = []
        for label, cells, _, _ in self.rows:
            for column in self.columns:
                for run, r in cells.get(column, []):
                    out.append({"plan": self.plan, "row": label, "column": column, "seed": r.get("seed", ""),
                                "micro_f1": _score(r, self.part, "micro_f1"), "macro_f1": _score(r, self.part, "macro_f1"),
                                "scored_on": self.part, "reported_split": r.get("reported_split", r.get("split")),
                                "run": run.dir_name})
        for label, values, _ in self.value_rows:
            out += [{"plan": self.plan, "row": label, "column": column, "seed": "", **values[column],
                     "scored_on": self.part, "reported_split": reported_split, "run": ""}
                    for column in self.columns if column in values]
        return out


def _finished(res: Results, runs: list[Run]) -> list[tuple[Run, dict]]:
    return [(run, r) for run in runs if (r := res.load(run)) is not None]


def _subset_runs(res: Results, plan: str, init: str, subset: float) -> list[Run]:
    """The KD students of Figures 2-3 for one initialization and training fraction."""
    return res.find(plan, init=init, teacher=_any, subset=subset if subset < 1 else None)


def build_tables(plan: str, res: Results, data_kind: str, task: TaskData) -> list[Table]:
    """The tables of one plan (figures have one table of the numbers they plot), with the
    teacher seeds' scores under each."""
    tables = _tables(plan, res, data_kind, task)
    for t in tables:
        t.notes.append(teacher_note(res, plan))
    return tables


def _seed_label(res: Results, plan: str) -> str:
    chosen = res.selection(plan)
    return f", seed {chosen['selected']['seed']}" if chosen else ""


def teacher_note(res: Results, plan: str) -> str:
    """All teacher seeds' dev scores (what selected one) and reported scores, the selected marked."""
    chosen = res.selection(plan)
    if chosen is None:
        return "Teachers: not trained yet."
    parts = [f"seed {c['seed']}: dev {100 * c['dev_score']:.2f}, {c['reported_split']} "
             f"{100 * c['final']['micro_f1']:.2f}" + (" (selected)" if c["run"] == chosen["selected"]["run"] else "")
             for c in chosen["candidates"]]
    return (f"Teachers, one per seed; the best {chosen['selected']['metric']} on the dev split of the training "
            f"languages teaches every student (micro-F1 overall, %): " + "; ".join(parts) + ".")


def _tables(plan: str, res: Results, data_kind: str, task: TaskData) -> list[Table]:
    full, half = res.planner.base_hidden, res.planner.base_hidden // 2
    layers = max(1, res.planner.base_layers // 2)
    if plan == "table2":
        t = Table(plan, "Table 2: three initializations, with (KD) and without (NON-KD) distillation; all languages",
                  ["NON-KD", "KD"], "overall")
        paper = PAPER["table2"]
        t.add(f"from-base (Teacher{_seed_label(res, plan)}), {res.planner.base_layers}L/{full}",
              {"NON-KD": res.selected_teacher(plan)}, _paper_cols(paper.get(("teacher", 12, 768), {}), data_kind),
              single=True)
        for hidden in (None, half):
            for init in INITS:
                width = hidden or full
                cells = {col: _finished(res, res.find(plan, init=init, hidden=hidden, no_kd=(col == "NON-KD") or None,
                                                      teacher=_any))
                         for col in ("NON-KD", "KD")}
                ref = paper.get((init, 6, 768 if hidden is None else 384), {})
                t.add(f"{init}, {layers}L/{width}", cells, _paper_cols(ref, data_kind))
        return [t]
    if plan == "table3":
        t = Table(plan, "Table 3: zero-shot; teacher on the seen languages; scored on the unseen languages",
                  ["NON-KD", "KD"], "unseen")
        t.add(f"from-base (Teacher{_seed_label(res, plan)}), seen lang", {"NON-KD": res.selected_teacher(plan)},
              _paper_cols(PAPER["table3"][("teacher", "seen")], data_kind), single=True)
        for langs in ("seen", "english"):
            for init in INITS:
                cells = {col: _finished(res, res.find(plan, init=init, langs=langs, teacher=_any,
                                                      no_kd=(col == "NON-KD") or None)) for col in ("NON-KD", "KD")}
                t.add(f"{init}, trained on {langs} lang", cells, _paper_cols(PAPER["table3"][(init, langs)], data_kind))
        return [t]
    if plan == "table4":
        t = Table(plan, "Table 4: teacher and students trained on English only, with KD; scored on the unseen languages",
                  ["F1"], "unseen")
        t.add(f"from-base (Teacher{_seed_label(res, plan)})", {"F1": res.selected_teacher(plan)},
              {"F1": PAPER["table4"]["teacher"].get(data_kind)}, single=True)
        for init in INITS:
            t.add(init, {"F1": _finished(res, res.find(plan, init=init, teacher=_any))},
                  {"F1": PAPER["table4"][init].get(data_kind)})
        return [t]
    if plan == "table5":
        t = Table(plan, "Table 5: the half-layer student copied from the teacher, with and without fine-tuning",
                  ["F1"], "overall")
        ref = PAPER["table5"]
        t.add("With Finetune", {"F1": _finished(res, res.find(plan, init="from-teacher", no_kd=None, teacher=_any))},
              {"F1": ref["with finetune"].get(data_kind)})
        t.add("Without Finetune", {"F1": _finished(res, res.find(plan, tool="evaluate"))},
              {"F1": ref["without finetune"].get(data_kind)}, single=True)  # no training: no seed
        t.add_value("Random Score (majority class)", {"F1": majority_score(task)},
                    {"F1": ref["random score"].get(data_kind)})
        return [t]
    if plan in ("figure2", "figure3"):
        t = Table(plan, f"{figure_title(plan, data_kind)}: KD students on stratified subsets of the "
                  "training data (all languages)", [f"{s:g}" for s in SUBSETS], "overall")
        for init in INITS:
            cells = {f"{s:g}": _finished(res, _subset_runs(res, plan, init, s)) for s in SUBSETS}
            t.add(init, cells, {})
        return [t]
    raise ValueError(plan)


def _paper_cols(ref: dict, data_kind: str) -> dict[str, float | None]:
    return {"NON-KD": ref.get((data_kind, False)), "KD": ref.get((data_kind, True))}


def figure_title(plan: str, data_kind: str) -> str:
    """Figures 2-3 are the paper's massive experiments: on other data the title says so."""
    name = "Figure 2" if plan == "figure2" else "Figure 3"
    return name if data_kind == "massive" else f"{name} ({data_kind}: not in the paper, whose figure is on massive)"


def data_warning(task: TaskData, data_kind: str) -> str | None:
    """One line when the data lacks languages of the paper's partitions or a test split (its
    scores then stand beside published numbers they do not measure); None when it has both."""
    problems = []
    paper = KNOWN_LANGUAGES.get(data_kind)
    if paper is not None:
        missing = paper - set(task.languages)
        if missing:
            unseen = sorted(missing & UNSEEN[data_kind])
            seen = sorted(missing - UNSEEN[data_kind])
            problems.append(f"holds {len(paper) - len(missing)} of the paper's {len(paper)} {data_kind} languages "
                            f"(missing seen: {', '.join(seen) or 'none'}; missing unseen: {', '.join(unseen) or 'none'})")
    if "test" not in task.splits:
        problems.append("has no test split (scores are on dev, which also selected the checkpoints)")
    if not problems:
        return None
    return (f"warning: {task.source} " + " and ".join(problems)
            + ": the scores are not comparable with the paper's numbers beside them")


def partitions_text(plan: str, task: TaskData) -> str:
    """Per partition of `plan`, the languages and example counts the runs actually used."""
    def count(split: str, langs) -> int:
        return sum(lang in langs for lang in task.splits[split].langs) if split in task.splits else 0

    lines = []
    for choice in TRAIN_LANGS[plan]:
        langs = resolve_languages(choice, task)
        lines.append(f"- trained on `{choice}`: {len(langs)} languages ({', '.join(sorted(langs)) or 'none'}); "
                     f"train {count('train', langs)} examples, dev {count('dev', langs)}")
    scored_choice = SCORED_LANGS.get(plan, "all")
    scored, split = resolve_languages(scored_choice, task), final_split(task)[0]
    lines.append(f"- scored on `{scored_choice}`: {len(scored)} languages ({', '.join(sorted(scored)) or 'none'}); "
                 f"{split} {count(split, scored)} examples")
    return "\n".join(lines)


def majority_score(task: TaskData) -> dict[str, float]:
    """The paper's "random score": every prediction the training data's majority class, scored on
    the reported split (micro-F1; macro-F1 beside it)."""
    majority = int(np.bincount(task.splits["train"].labels).argmax())
    gold = task.splits[final_split(task)[0]].labels
    pred = np.full_like(gold, majority)
    return {"micro_f1": micro_f1(gold, pred), "macro_f1": macro_f1(gold, pred)}


def write_plan(plan: str, tables: list[Table], out: Path, settings_text: str, task: TaskData, data_kind: str,
               settings_key: str) -> Path:
    """PLAN.md and PLAN.csv in `out` (each CSV row names the settings by `settings_key`); returns
    the Markdown path."""
    known = data_kind in ("massive", "tsm")
    reported_split = final_split(task)[0]
    parts = []
    for t in tables:
        parts.append(f"## {t.title}")
        parts += [t.markdown(metric, name, known) for metric, name in METRICS] + t.notes
    note = (f"Scores are on the {reported_split} split"
            + (" (the data has no test split: dev also selected the checkpoints, so they are optimistic)"
               if reported_split == "dev" else "") + ".")
    paper_note = ("The paper's numbers (micro-F1, %) are from its tables, for reference; they were measured on the "
                  f"full {data_kind} data with xlm-roberta-base." if known else
                  "No published numbers to compare with for this data.")
    warning = data_warning(task, data_kind)
    head = [f"# {plan}", note, paper_note] + ([f"**{warning}**"] if warning else [])
    text = "\n\n".join(head + [*parts, "## Data used", partitions_text(plan, task), "## Settings", settings_text]) + "\n"
    atomic_write(out / f"{plan}.md", text)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for t in tables:
        writer.writerows({**r, "settings": settings_key} for r in t.records(reported_split))
    atomic_write(out / f"{plan}.csv", buf.getvalue())
    return out / f"{plan}.md"


def mean_loss_curve(res: Results, runs: list[Run], window: int) -> np.ndarray | None:
    """The training loss in windows of `window` steps, mean over the finished seeds (None when
    none finished)."""
    curves = [res.loss_windows(run, window) for run in runs if res.load(run) is not None]
    if not curves:
        return None
    n = min(map(len, curves))
    return np.mean([c[:n] for c in curves], axis=0)


def draw_figures(plans: list[str], res: Results, out: Path, data_kind: str) -> list[Path]:
    """figure2.png (F1 vs training fraction, error bars over seeds) and figure3.png (training loss,
    mean over windows of steps, a panel per subset); [] when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    if "figure2" in plans:
        fig, ax = plt.subplots(figsize=(6, 4))
        for init in INITS:
            xs, means, stds = [], [], []
            for s in SUBSETS:
                vals = [_score(r, "overall", "micro_f1") for _, r in _finished(res, _subset_runs(res, "figure2", init, s))]
                if vals:
                    xs.append(100 * s), means.append(100 * np.mean(vals))
                    stds.append(100 * np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=init)
        ax.set_xscale("log")
        ax.set_xticks([100 * s for s in SUBSETS], [f"{100 * s:g}%" for s in SUBSETS])
        ax.set(xlabel="training data", ylabel="micro-F1 (%)",
               title=f"{figure_title('figure2', data_kind)}: F1 vs data size (KD students)")
        ax.legend()
        written.append(_save(fig, out / "figure2.png", plt))
    if "figure3" in plans:
        window = LOSS_WINDOW.get(data_kind, PAPER_LOSS_WINDOW)
        fig, axes = plt.subplots(1, len(SUBSETS), figsize=(3.2 * len(SUBSETS), 3.2), sharey=True)
        for ax, s in zip(axes, SUBSETS):
            for init in INITS:
                curve = mean_loss_curve(res, _subset_runs(res, "figure3", init, s), window)
                if curve is not None:
                    ax.plot(window * np.arange(1, len(curve) + 1), curve, label=init, linewidth=1, marker=".")
            ax.set(title=f"{100 * s:g}% of the data", xlabel=f"step (mean over windows of {window} steps)")
        axes[0].set_ylabel("training loss (KD + CE)")
        axes[0].legend()
        fig.suptitle(f"{figure_title('figure3', data_kind)}: training loss, mean over windows of {window} steps")
        written.append(_save(fig, out / "figure3.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
