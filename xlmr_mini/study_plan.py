"""Which runs each of the paper's tables and figures needs (sections 3.2-4.3), as plain commands.

A run is one `python -m xlmr_mini.train` (or, for Table 5's copied student, `python -m
xlmr_mini.evaluate`) command, identified by its full configuration: two plans that need the same
configuration share one run (Table 2's from-teacher KD 6L/768 is also Table 5's "with finetune"
and Figure 2's 100% point). Its directory name carries a hash of that configuration and of its
inputs' content (`run_identity`), so a run is found again by every later study command, in a
moved study folder too, and never mixed up with another.

Teachers: one per training-language set (Table 2: all languages; Table 3: the seen languages;
Table 4: English), fine-tuned from the base with every study seed; `select_teacher` then picks the
best on the training languages' dev split, and every student of that set learns from it (the
paper: "except for the teacher model, where we selected one of the best models"). Students have
half the teacher's layers; Table 2 also has students of half its width.

On real data every run gets the paper's settings for its section (`train_config.paper_settings`:
batch 8, 30 epochs, fp32, plain random batches, the section's evaluation steps and none off
that grid); Table 3's English-trained students are §3.3's.
"""
import dataclasses
import functools
from pathlib import Path

from xlmr_mini.copy_weights import INITS
from xlmr_mini.run_identity import INPUTS, RESULT_NEUTRAL, data_fingerprint, key, model_fingerprint, settings, study_identity
from xlmr_mini.train_config import TrainConfig, paper_settings, parse_config

PLANS = ("table2", "table3", "table4", "table5", "figure2", "figure3")
# Student flags that do not enter the teacher cache's key: every student of a teacher that differs
# only in these reads one cache (both widths, every init and seed).
NOT_IN_CACHE_KEY = ("init", "base", "hidden", "seed", "no-kd")
SUBSETS = (0.01, 0.05, 0.1, 0.2, 1.0)  # Figure 2: stratified fractions of the training data
TOOL_RESULTS = {"train": "results.json", "evaluate": "scores.json", "select_teacher": "selection.json",
                "cache_teacher": "cache.json"}

# The paper's published micro-F1 (%), for reference beside ours.
PAPER = {
    "table2": {  # (init, layers, units) -> {(dataset, kd): value}
        ("teacher", 12, 768): {("massive", False): 80.13, ("tsm", False): 70.10},
        ("from-teacher", 6, 768): {("massive", False): 81.18, ("massive", True): 81.63, ("tsm", False): 62.99, ("tsm", True): 67.61},
        ("from-base", 6, 768): {("massive", False): 80.37, ("massive", True): 81.61, ("tsm", False): 60.17, ("tsm", True): 65.94},
        ("from-scratch", 6, 768): {("massive", False): 75.19, ("massive", True): 79.23, ("tsm", False): 50.20, ("tsm", True): 54.13},
        ("from-teacher", 6, 384): {("massive", False): 78.20, ("massive", True): 79.90, ("tsm", False): 56.74, ("tsm", True): 58.34},
        ("from-base", 6, 384): {("massive", False): 77.55, ("massive", True): 79.41, ("tsm", False): 55.03, ("tsm", True): 58.15},
        ("from-scratch", 6, 384): {("massive", False): 75.27, ("massive", True): 78.05, ("tsm", False): 50.01, ("tsm", True): 51.63},
    },
    "table3": {  # (init, training languages) -> {(dataset, kd): value}, scored on unseen languages
        ("teacher", "seen"): {("massive", False): 68.22, ("tsm", False): 57.11},
        ("from-teacher", "seen"): {("massive", False): 64.30, ("massive", True): 65.74, ("tsm", False): 53.99, ("tsm", True): 54.02},
        ("from-base", "seen"): {("massive", False): 62.77, ("massive", True): 64.82, ("tsm", False): 52.31, ("tsm", True): 52.36},
        ("from-scratch", "seen"): {("massive", False): 15.08, ("massive", True): 15.10, ("tsm", False): 37.93, ("tsm", True): 40.27},
        ("from-teacher", "english"): {("massive", False): 47.23, ("massive", True): 59.65, ("tsm", False): 54.36, ("tsm", True): 53.35},
        ("from-base", "english"): {("massive", False): 38.69, ("massive", True): 46.16, ("tsm", False): 50.47, ("tsm", True): 49.74},
        ("from-scratch", "english"): {("massive", False): 5.25, ("massive", True): 7.55, ("tsm", False): 34.39, ("tsm", True): 33.24},
    },
    "table4": {  # init -> {dataset: value}: teacher and students trained on English, scored on unseen
        "teacher": {"massive": 56.42, "tsm": 58.97}, "from-teacher": {"massive": 47.85, "tsm": 54.18},
        "from-base": {"massive": 42.05, "tsm": 51.56}, "from-scratch": {"massive": 7.50, "tsm": 35.10},
    },
    "table5": {  # row -> {dataset: value}
        "with finetune": {"massive": 81.63, "tsm": 67.61}, "without finetune": {"massive": 38.05, "tsm": 33.57},
        "random score": {"massive": 7.0, "tsm": 33.33},
    },
}


@dataclasses.dataclass
class Run:
    """One command of the study. `tool` is "train", "evaluate", "select_teacher" or "cache_teacher" (a module of
    xlmr_mini); `argv` its arguments, without --out (or --json), which the run's directory
    supplies; `after` the runs that must finish first."""

    name: str
    tool: str
    argv: list[str]
    after: list[str] = dataclasses.field(default_factory=list)
    plans: set[str] = dataclasses.field(default_factory=set)
    key: str = ""  # a hash of the configuration; the directory is f"{name}-{key}"

    @property
    def dir_name(self) -> str:
        return f"{self.name}-{self.key}"

    @property
    def result_file(self) -> str:
        """What a finished run leaves in its directory: train's results.json, evaluate's --json,
        select_teacher's selection.json, cache_teacher's cache.json."""
        return TOOL_RESULTS[self.tool]


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What every run shares: the data, the base, the precision (resolved: part of every run's
    identity) and the overrides the user gave."""

    data: str
    base: str
    seeds: tuple[int, ...]
    out: Path
    overrides: tuple[tuple[str, str], ...] = ()  # (flag, value) given to the study, passed to every run
    precision: str = "fp32"  # the paper's (transformers' default)
    teacher_epochs: int | None = None  # the demo's teachers train longer than its students

    @property
    def kind(self) -> str:
        return self.data.split(":", 1)[0]

    @property
    def is_demo(self) -> bool:
        return self.kind == "demo"

    @property
    def teacher_cache(self) -> bool:
        """Whether KD students read a teacher cache stage (off: `--teacher-cache off`, the teacher live)."""
        return dict(self.overrides).get("teacher-cache") != "off"


BOOLEAN_OPTIONS = ("group-by-length", "eval-last-step")  # --x / --no-x flags of train


def flags_to_argv(pairs: dict) -> list[str]:
    argv = []
    for flag, value in pairs.items():
        if value is True:
            argv.append(f"--{flag}")
        elif value is False and flag in BOOLEAN_OPTIONS:
            argv.append(f"--no-{flag}")
        elif value is not None and value is not False:
            argv += [f"--{flag}", *map(str, value if isinstance(value, (list, tuple)) else [value])]
    return argv


def common_flags(s: StudySettings, section: str) -> dict:
    """Flags every training run of a section gets: the data and precision; on real data the
    paper's settings for the section (seeds apart: one run per seed)."""
    flags = {"data": s.data, "precision": s.precision}
    if not s.is_demo:
        paper = paper_settings(s.data, section)
        flags.update({"batch-size": paper["batch_size"], "epochs": paper["epochs"], "eval-steps": paper["eval_steps"],
                      "group-by-length": paper["group_by_length"], "eval-last-step": paper["eval_last_step"],
                      "logging-steps": paper["logging_steps"]})
    flags.update(dict(s.overrides))
    return flags


class Planner:
    """Builds the runs of the plans asked for; identical configurations collapse into one run.

    A run's key is a hash of its identity (`run_identity`): its settings, the data's and the
    base's content, and for a student the key of its teacher's run. Paths take no part, so a
    moved study folder finds its runs again, and data changed in place gives new runs."""

    def __init__(self, settings: StudySettings, base_layers: int, base_hidden: int):
        self.s, self.base_layers, self.base_hidden = settings, base_layers, base_hidden
        self.runs: dict[str, Run] = {}

    @functools.cached_property
    def data_id(self) -> str:
        return data_fingerprint(self.s.data, dict(self.s.overrides).get("cache-dir"))

    @functools.cached_property
    def base_id(self) -> str:
        return model_fingerprint(self.s.base, dict(self.s.overrides).get("cache-dir"))

    def identity(self) -> dict:
        """What the study's tables are made with."""
        return study_identity(self.s, self.data_id, self.base_id)

    def add(self, plan: str, name: str, tool: str, flags: dict, after: list[Run] = (), argv: list[str] = ()) -> Run:
        """The run of `tool` with these flags (and leading `argv`: the paths of runs in `after`, the
        runs it needs, which take part in its identity by their keys)."""
        inputs = {"data": self.data_id, "base": self.base_id if flags.get("base") else None,
                  "after": [r.key for r in after]}
        if tool == "train":  # the trainer's own notion of "the same run", with its inputs by content
            identity = {"tool": tool, **settings(parse_config(flags_to_argv(flags) + ["--out", "x"])), **inputs}
        else:
            settings_argv = flags_to_argv({k: v for k, v in flags.items() if k not in INPUTS + RESULT_NEUTRAL})
            identity = {"tool": tool, "argv": settings_argv, **inputs}
        k = key(identity)
        run = self.runs.setdefault(k, Run(name=name, tool=tool, argv=list(argv) + flags_to_argv(flags),
                                          after=[r.key for r in after], key=k))
        run.plans.add(plan)
        return run

    def path(self, run: Run) -> Path:
        return self.s.out / "runs" / run.dir_name

    def teacher(self, plan: str, langs: str, section: str) -> Run:
        """A teacher per study seed, and the run that selects the best of them (which students
        name as their --teacher: `path(selection) / "best"`)."""
        seeds = []
        for seed in self.s.seeds:
            flags = {**common_flags(self.s, section), "init": "from-base", "base": self.s.base, "no-kd": True,
                     "layers": self.base_layers, "langs": langs, "seed": seed}
            if self.s.teacher_epochs:
                flags["epochs"] = self.s.teacher_epochs
            seeds.append(self.add(plan, f"teacher-{langs}-seed{seed}", "train", flags))
        return self.add(plan, f"teacher-{langs}-selected", "select_teacher", {}, after=seeds,
                        argv=[str(self.path(t)) for t in seeds])

    def student(self, plan: str, teacher: Run, init: str, kd: bool, langs: str, section: str, seed: int,
                hidden: int | None = None, subset: float = 1.0) -> Run:
        flags = {**common_flags(self.s, section), "init": init, "teacher": self.path(teacher) / "best",
                 "layers": max(1, self.base_layers // 2), "hidden": hidden, "langs": langs,
                 "no-kd": not kd, "subset": subset if subset < 1.0 else None, "seed": seed}
        if init == "from-base":
            flags["base"] = self.s.base
        width = hidden or self.base_hidden
        name = (f"student-{init}-{'kd' if kd else 'nokd'}-{width}-{langs}"
                + (f"-{subset:g}" if subset < 1.0 else "") + f"-seed{seed}")
        run = self.add(plan, name, "train", flags, after=[teacher])
        if kd and self.s.teacher_cache:  # not part of the student's identity: reading the cache is the same run
            cache = self.teacher_cache(plan, teacher, flags, langs, subset)
            run.after += [cache.key] if cache.key not in run.after else []
        return run

    def teacher_cache(self, plan: str, teacher: Run, student_flags: dict, langs: str, subset: float) -> Run:
        """The stage that computes the teacher's outputs once for the KD students that read them."""
        flags = {k: v for k, v in student_flags.items() if k not in NOT_IN_CACHE_KEY}
        name = f"teacher-cache-{langs}" + (f"-{subset:g}" if subset < 1.0 else "")
        return self.add(plan, name, "cache_teacher", flags, after=[teacher])

    def copied_student(self, plan: str, teacher: Run) -> Run:
        flags = {"init": "from-teacher", "teacher": self.path(teacher) / "best", "data": self.s.data,
                 "layers": max(1, self.base_layers // 2), "precision": self.s.precision}
        flags.update({k: v for k, v in self.s.overrides if k in ("cache-dir", "max-length", "device")})
        return self.add(plan, "copied-from-teacher-all", "evaluate", flags, after=[teacher])


def plan_runs(plans: list[str], planner: Planner) -> dict[str, Run]:
    """Every run `plans` need, keyed by configuration hash, in a dependency-respecting order."""
    p, seeds, half = planner, planner.s.seeds, planner.base_hidden // 2
    for plan in plans:
        if plan == "table2":
            t = p.teacher(plan, "all", "3.2")
            for init in INITS:
                for kd in (False, True):
                    for hidden in (None, half):
                        for seed in seeds:
                            p.student(plan, t, init, kd, "all", "3.2", seed, hidden)
        elif plan == "table3":
            t = p.teacher(plan, "seen", "3.3")
            for init in INITS:
                for kd in (False, True):
                    for langs in ("seen", "english"):
                        for seed in seeds:
                            p.student(plan, t, init, kd, langs, "3.3", seed)
        elif plan == "table4":
            t = p.teacher(plan, "english", "3.4")
            for init in INITS:
                for seed in seeds:
                    p.student(plan, t, init, True, "english", "3.4", seed)
        elif plan == "table5":
            t = p.teacher(plan, "all", "3.2")
            p.copied_student(plan, t)
            for seed in seeds:
                p.student(plan, t, "from-teacher", True, "all", "3.2", seed)
        elif plan in ("figure2", "figure3"):
            t = p.teacher(plan, "all", "3.2")
            for subset in SUBSETS:
                for init in INITS:
                    for seed in seeds:
                        p.student(plan, t, init, True, "all", "3.2", seed, subset=subset)
        else:
            raise ValueError(f"unknown plan {plan!r}")
    # teachers, their selections and caches (each after its selection), students, evaluations
    stage = {"train": 0, "select_teacher": 0, "cache_teacher": 0, "evaluate": 1}
    return dict(sorted(p.runs.items(), key=lambda kv: (stage[kv[1].tool], kv[1].tool == "train" and bool(kv[1].after),
                                                       kv[1].tool in ("select_teacher", "cache_teacher"))))


def train_config(run: Run, out: Path) -> TrainConfig:
    """The run's TrainConfig, writing into `out` and resuming whatever is there."""
    return parse_config(run.argv + ["--out", str(out), "--resume"])
