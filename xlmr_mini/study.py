"""Reproduce the paper's tables and figures in one command: teachers, students, evaluation, report.

    python -m xlmr_mini.study all --data demo                        # every plan on the demo, minutes
    python -m xlmr_mini.study table2 --data tsm:PATH --base xlm-roberta-base/ --out runs/study
    python -m xlmr_mini.study all --data massive:PATH --base XLMR --emit-commands cmds.txt

PLAN is one of table2 table3 table4 table5 figure2 figure3, or all. Every run is an ordinary
`python -m xlmr_mini.train` command (`study_plan` says which ones), kept in `--out/runs/` under a
name that carries a hash of its configuration: a finished run is reused by every plan and every
later command that needs it, an interrupted one resumes from its checkpoint (kill -9 at any
moment and the rerun ends with the same numbers; `--jobs` workers die with the study, and a run
directory being written is locked, so a second study stops with one line instead of writing it
too). Then `study_report` writes PLAN.md, PLAN.csv and the figures into --out, each naming the
settings it was made with; a later study with other settings is refused unless `--overwrite`.

On real data the runs use the paper's settings (batch 8, its evaluation steps per section and none
off that grid, 30 epochs, seeds 1 2 3, fp32, plain random batches); each teacher is trained with
every seed and the best on its training languages' dev split teaches the students. `--epochs`,
`--max-steps`, `--batch-size`, `--precision`, ... override them for quicker studies and are
written into every output. The demo has its own small pretrained base (a short masked-LM
pretraining on its text) and shorter schedules.
"""
import argparse
import ctypes
import dataclasses
import json
import math
import multiprocessing
import os
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from xlmr_mini.cache_teacher import cache_teacher
from xlmr_mini.checkpoint import check_model_dir
from xlmr_mini.config import XLMRConfig
from xlmr_mini.data import TaskData, default_cache_dir, load_task, parse_spec, select_languages, stratified_subset
from xlmr_mini.demo_models import demo_base
from xlmr_mini.errors import InputError, OneLineErrorParser, cli_main, deprecated_alias
from xlmr_mini.evaluate import main as evaluate_main
from xlmr_mini.files import atomic_write, check_apart, check_output_dir, check_output_file
from xlmr_mini.hardware import PRECISIONS, resolve_device, resolve_precision
from xlmr_mini.kd_step import TrainingError
from xlmr_mini.inference import final_split
from xlmr_mini.progress import clock
from xlmr_mini.run_identity import differences, key
from xlmr_mini.select_teacher import select_teacher
from xlmr_mini.study_estimate import cache_sizer, measure_step_seconds
from xlmr_mini.study_plan import PLANS, Planner, Run, StudySettings, plan_runs, train_config
from xlmr_mini.teacher_cache import cache_directory, free_bytes, size_text
from xlmr_mini.study_report import Results, build_tables, data_warning, draw_figures, write_plan
from xlmr_mini.train import train
from xlmr_mini.train_config import DEMO_EPOCHS, TrainConfig, check_seeds, parse_config

# The demo's schedules: teachers fine-tune the pretrained demo base, students distil in a few epochs.
DEMO_TEACHER_EPOCHS, DEMO_STUDENT_EPOCHS = 20, DEMO_EPOCHS
PR_SET_PDEATHSIG = 1  # linux/prctl.h
TABLE_SETTINGS = "study.json"  # plan -> the settings its PLAN.md and PLAN.csv were made with
OVERRIDES = ("epochs", "max_steps", "batch_size", "eval_steps", "lr", "max_length", "device", "num_threads",
             "cache_dir", "att_target", "kd_impl", "compile", "deterministic", "teacher_cache",
             "recompute")


def _parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m xlmr_mini.study", description=__doc__.split("\n\n")[0])
    p.add_argument("plan", choices=PLANS + ("all",), help="which table or figure of the paper (or all)")
    p.add_argument("--data", default="demo", help="massive:PATH, tsm:PATH or demo (default: demo)")
    p.add_argument("--base", help="pretrained base HF directory, e.g. xlm-roberta-base (the demo has its own)")
    p.add_argument("--seed", dest="seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="student seeds; teachers take the first (default: 1 2 3, the paper's)")
    deprecated_alias(p, "--seeds", "--seed", dest="seeds", type=int, nargs="+")
    p.add_argument("--out", type=Path, default=Path("runs/study"),
                   help="study directory: PLAN.md, PLAN.csv, the figures, and runs/ with every run's directory "
                   "(default: runs/study)")
    p.add_argument("--jobs", type=int, help="runs at once, one GPU each when there are GPUs (default: the number of "
                   "GPUs; without: 1, or one per CPU core for the demo, whose runs use one thread each)")
    p.add_argument("--dry-run", action="store_true", help="list the runs with a time estimate; train nothing")
    p.add_argument("--emit-commands", type=Path, help="write the runs as shell commands in dependency stages and stop")
    p.add_argument("--overwrite", action="store_true", help="replace tables in --out that other settings made "
                   "(without it such a study is refused; finished runs are kept either way)")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in OVERRIDES:
        flag = "--" + name.replace("_", "-")
        if fields[name].type is bool:  # a switch: --deterministic
            p.add_argument(flag, action="store_const", const=True, help=f"passed to every run's {flag}")
            continue
        kind = int if name in ("epochs", "max_steps", "batch_size", "eval_steps", "max_length", "num_threads") else \
            float if name == "lr" else str
        meta = fields[name].metadata
        alone = {"nargs": "?", "const": meta["const"]} if "const" in meta else {}  # --compile means --compile on
        p.add_argument(flag, type=kind, choices=meta.get("choices"), help=f"passed to every run's {flag}", **alone)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="every run's --precision (default: fp32, the paper's; auto is resolved once here, for this "
                        "machine and the base's width, and the runs record what it resolved to)")
    return p


def settings_from(args) -> tuple[StudySettings, XLMRConfig]:
    kind = args.data.split(":", 1)[0]
    if args.jobs is None:
        gpus = torch.cuda.device_count()
        args.jobs = gpus or (min(4, os.cpu_count() or 1) if kind == "demo" else 1)
    if args.jobs < 1:
        raise InputError(f"--jobs {args.jobs}: must be at least 1")
    if kind not in ("demo", "massive", "tsm"):
        raise InputError(f"--data {args.data}: the study reproduces the paper on massive:PATH or tsm:PATH (or demo)")
    check_seeds(tuple(args.seeds))
    check_output_dir(args.out, "--out")
    if args.emit_commands is not None:
        check_output_file(args.emit_commands, "--emit-commands")
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir, "--cache-dir")
    if args.device is not None:
        resolve_device(args.device)
    base = args.base
    if base is not None:
        check_model_dir(base, "--base")
    else:
        if kind != "demo":
            raise InputError("--base: give the pretrained base directory (e.g. xlm-roberta-base); only the demo has its own")
        base = str(demo_base(args.cache_dir))
    base_cfg = XLMRConfig.from_hf(base)
    overrides = {name.replace("_", "-"): getattr(args, name) for name in OVERRIDES
                 if getattr(args, name) is not None}
    TrainConfig(**{name.replace("-", "_"): value for name, value in overrides.items()})  # checks their ranges
    shortened = "epochs" in overrides or "max-steps" in overrides
    if kind == "demo":
        overrides.setdefault("epochs", DEMO_STUDENT_EPOCHS)
        overrides.setdefault("num-threads", 1)
    precision = resolve_precision(args.precision, resolve_device(args.device or "auto"), base_cfg.hidden_size,
                                  args.cache_dir or default_cache_dir())
    s = StudySettings(data=args.data, base=str(Path(base).resolve()), seeds=tuple(args.seeds), out=args.out.resolve(),
                      overrides=tuple(overrides.items()), precision=precision,
                      teacher_epochs=DEMO_TEACHER_EPOCHS if kind == "demo" and not shortened else None)
    return s, base_cfg


def settings_text(s: StudySettings, base_cfg: XLMRConfig, planner: Planner) -> str:
    given = ", ".join(f"--{k} {v}" for k, v in s.overrides) or "none"
    return (f"- settings key `{key(planner.identity())}` (the `settings` column of the CSV)\n"
            f"- data: `{s.data}` ({planner.data_id}); base: `{s.base}` ({base_cfg.num_hidden_layers} layers x "
            f"{base_cfg.hidden_size}; {planner.base_id})\n"
            f"- seeds: {' '.join(map(str, s.seeds))} (teachers too: the best on dev teaches the students)\n"
            f"- precision: {s.precision}" + (" (the paper's: transformers' default fp32)\n" if s.precision == "fp32"
                                             else " (the paper trained in fp32)\n")
            + f"- every run's flags are in its run.json under `runs/`; study overrides: {given}\n"
            + ("- real data: the paper's settings (batch 8, §3.1's evaluation steps per section and no evaluation off "
               "that grid, 30 epochs, plain random batches) unless overridden\n"
               if not s.is_demo else f"- demo: teachers {s.teacher_epochs} epochs, students {DEMO_STUDENT_EPOCHS}\n"
               if s.teacher_epochs else "- demo: teachers and students as the overrides say\n"))


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def run_one(run: Run, out: Path) -> None:
    """Train, select a teacher or evaluate: one run into `out`; a finished run returns at once."""
    if run.tool == "train":
        try:
            train(train_config(run, out), quiet=True, label=run.dir_name)
        except TrainingError as e:
            raise TrainingError(f"run {out}: {e}") from None
    elif run.tool == "cache_teacher":
        cache_teacher(parse_config(run.argv + ["--out", str(out)]))
    elif run.tool == "select_teacher":
        select_teacher([Path(d) for d in run.argv], out)
    elif not (out / run.result_file).is_file():
        out.mkdir(parents=True, exist_ok=True)
        evaluate_main(run.argv + ["--json", str(out / run.result_file)])


def _finished(planner: Planner, run: Run) -> bool:
    return (planner.path(run) / run.result_file).is_file()


def _init_worker(started, devices: list[str | None], parent: int) -> None:
    """Each worker process dies with the study and sees one GPU (`worker_gpus`, by start order)."""
    _die_with(parent)
    with started.get_lock():
        device = devices[started.value % len(devices)]
        started.value += 1
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device


def _die_with(parent: int) -> None:
    """End this process when `parent` ends, a kill -9 included, so that no worker trains on into
    --out unseen: on Linux the kernel sends SIGKILL (PR_SET_PDEATHSIG), elsewhere a thread
    watches the parent. A parent already gone ends it at once."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def execute(runs: dict[str, Run], planner: Planner, jobs: int, estimate) -> None:
    """Run what is not finished, a run only after the runs it needs; one progress line each."""
    todo = {k: r for k, r in runs.items() if not _finished(planner, r)}
    print(f"study: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run")
    if not todo:
        return
    total_est = sum(estimate(r) for r in todo.values())
    started, done_est, done = time.time(), 0.0, set(k for k in runs if k not in todo)
    pool, futures = _pool(jobs), {}
    try:
        while todo or futures:
            ready = [k for k, r in todo.items() if all(a in done for a in r.after)]
            for key in ready[: max(0, jobs - len(futures))] if pool else ready[:1]:
                run = todo.pop(key)
                if pool:
                    futures[pool.submit(run_one, run, planner.path(run))] = (key, run, time.time())
                else:
                    t0 = time.time()
                    run_one(run, planner.path(run))
                    futures[None] = (key, run, t0)
            finished = [None] if not pool else wait(futures, return_when=FIRST_COMPLETED).done
            for fut in finished:
                key, run, t0 = futures.pop(fut)
                if fut is not None:
                    fut.result()
                done.add(key)
                done_est += estimate(run)
                rate = (time.time() - started) / max(done_est, 1e-9)
                eta = rate * (total_est - done_est)
                print(f"[{len(done)}/{len(runs)}] {run.dir_name} ({', '.join(sorted(run.plans))}): "
                      f"{time.time() - t0:.0f}s; ETA {clock(eta)}", flush=True)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def worker_gpus(jobs: int) -> list[str | None]:
    """The `CUDA_VISIBLE_DEVICES` of each of `jobs` workers: this process's visible GPUs round
    robin, named as the parent's own `CUDA_VISIBLE_DEVICES` names them (4,5,6,7 stay 4,5,6,7, not
    0..3); None for every worker without GPUs."""
    gpus = torch.cuda.device_count()
    if not gpus:
        return [None] * jobs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in visible.split(",")][:gpus] if visible else [str(i) for i in range(gpus)]
    return [names[i % gpus] for i in range(jobs)]


def _pool(jobs: int):
    if jobs == 1:
        return None
    ctx = multiprocessing.get_context("spawn")
    # A shared counter, not a Manager: a manager is one more process, which outlives a killed study.
    started = ctx.Value("i", 0)
    return ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(started, worker_gpus(jobs), os.getpid()))


# ---------------------------------------------------------------------------------------------
# Estimates, listings, commands
# ---------------------------------------------------------------------------------------------
def step_counter(task: TaskData):
    """run -> the number of optimizer steps it will take (from the data's sizes and its flags); for a
    teacher cache, the examples it runs the teacher on."""
    sizes: dict[tuple, int] = {}

    def steps(run: Run) -> int:
        if run.tool not in ("train", "cache_teacher"):
            return 0
        cfg = train_config(run, Path("x"))
        key = (cfg.train_langs, cfg.subset)
        if key not in sizes:
            sizes[key] = len(stratified_subset(select_languages(task.splits["train"], cfg.train_langs, task),
                                               cfg.subset, seed=0).labels)
        if run.tool == "cache_teacher":  # its unit of work is an example
            return sizes[key]
        return cfg.max_steps or (cfg.epochs or 30) * math.ceil(sizes[key] / cfg.batch_size)

    return steps


def list_runs(runs: dict[str, Run], planner: Planner, steps, seconds_per_step, cache_size) -> None:
    total, disk = 0.0, 0
    for run in runs.values():
        secs = 0.0 if _finished(planner, run) else steps(run) * seconds_per_step(run)
        total += secs
        state = "done" if _finished(planner, run) else f"~{clock(secs)}"
        size = cache_size(run) if run.tool == "cache_teacher" else 0
        disk += size
        print(f"{run.dir_name:<58} {state:>9}  {run.tool} ({', '.join(sorted(run.plans))})"
              + (f", {size_text(size)}" if size else ""))
        print(f"    {' '.join(Path(a).name if run.tool == 'select_teacher' else a for a in run.argv)}")
    print(f"{len(runs)} runs; estimated time for the rest on this machine: {clock(total)} "
          f"(from measured step rates; one run at a time)")
    caches = [r for r in runs.values() if r.tool == "cache_teacher"]
    if caches:
        where = cache_directory(train_config(caches[0], Path("x")))
        print(f"teacher caches: {len(caches)}, {size_text(disk)} of disk in {where} ({size_text(free_bytes(where))} "
              f"free there); KD students read them instead of running the teacher")


def emit_commands(runs: dict[str, Run], planner: Planner, path: Path) -> None:
    """The runs as shell commands, stage by stage: each stage needs only the stages before it."""
    stages: list[list[Run]] = []
    placed: dict[str, int] = {}
    for key, run in runs.items():
        stage = 1 + max((placed[a] for a in run.after), default=-1)
        placed[key] = stage
        while len(stages) <= stage:
            stages.append([])
        stages[stage].append(run)
    lines = ["# xlmr_mini study: one command per line; run each stage's lines in any order or in parallel,",
             "# a stage only after the one before it has finished. Then rerun the study command to write the tables."]
    for i, stage in enumerate(stages, 1):
        lines.append(f"# stage {i}: {len(stage)} runs")
        for run in stage:
            out = planner.path(run)
            extra = {"train": ["--out", str(out), "--resume"], "select_teacher": ["--out", str(out)],
                     "cache_teacher": ["--out", str(out)],
                     "evaluate": ["--json", str(out / run.result_file)]}[run.tool]
            lines.append(" ".join([sys.executable, "-m", f"xlmr_mini.{run.tool}", *map(shlex.quote, run.argv + extra)]))
    atomic_write(path, "\n".join(lines) + "\n")
    print(f"wrote {sum(map(len, stages))} commands in {len(stages)} stages to {path}")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
@cli_main
def main(argv=None) -> list[Path]:
    try:
        return _main(argv)
    except TrainingError as e:
        print(f"error: training stopped: {e} The runs that finished are kept: rerun the study once this is "
              f"fixed.", file=sys.stderr)
        raise SystemExit(1)


def _main(argv) -> list[Path]:
    args = _parser().parse_args(argv)
    s, base_cfg = settings_from(args)
    check_apart("--out", s.out, {"--base": args.base, "--data": parse_spec(s.data)[1] or None})
    plans = list(PLANS) if args.plan == "all" else [args.plan]
    planner = Planner(s, base_cfg.num_hidden_layers, base_cfg.hidden_size)
    runs = plan_runs(plans, planner)
    if args.emit_commands:
        emit_commands(runs, planner, args.emit_commands)
        return []
    task = load_task(s.data, cache_dir=dict(s.overrides).get("cache-dir"))
    warning = data_warning(task, s.kind)
    if warning:
        print(warning)
    steps = step_counter(task)
    if args.dry_run:
        list_runs(runs, planner, steps, measure_step_seconds(s, base_cfg, task), cache_sizer(s, base_cfg, task))
        return []
    check_tables(plans, s.out, planner.identity(), args.overwrite)
    unfinished = any(not _finished(planner, r) for r in runs.values())
    rates = measure_step_seconds(s, base_cfg, task) if unfinished else None
    execute(runs, planner, args.jobs, (lambda r: steps(r) * rates(r)) if rates else (lambda r: 1.0))
    return report(plans, runs, planner, s, base_cfg, task)


def _tables_made(out: Path) -> dict:
    path = out / TABLE_SETTINGS
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        raise InputError(f"{path}: not valid JSON; delete it and pass --overwrite to write the tables again") from None


def check_tables(plans: list[str], out: Path, identity: dict, overwrite: bool) -> None:
    """Refuse, before any training, to replace a plan's tables that other settings made (unless
    --overwrite): each PLAN.md and PLAN.csv holds the numbers of one setting."""
    made = _tables_made(out)
    for plan in plans:
        if overwrite or not (out / f"{plan}.md").exists() or made.get(plan) == identity:
            continue
        what = differences(made[plan], identity) if plan in made else "settings not recorded"
        raise InputError(f"--out {out}: {plan}.md holds the tables of other settings ({what}); choose another "
                         f"--out, or pass --overwrite to replace them (finished runs are kept)")


def report(plans: list[str], runs: dict[str, Run], planner: Planner, s: StudySettings, base_cfg,
           task: TaskData) -> list[Path]:
    res = Results(runs, planner)
    identity = planner.identity()
    written = [write_plan(plan, build_tables(plan, res, s.kind, task), s.out, settings_text(s, base_cfg, planner), task,
                          s.kind, key(identity)) for plan in plans]
    atomic_write(s.out / TABLE_SETTINGS, json.dumps({**_tables_made(s.out), **dict.fromkeys(plans, identity)},
                                                    indent=1) + "\n")
    figures = draw_figures(plans, res, s.out, s.kind)
    wanted = [p for p in plans if p.startswith("figure")]
    print("study: wrote " + ", ".join(str(p) for p in written + figures))
    if wanted and not figures:
        print("study: figures need matplotlib: pip install -e \".[plot]\" (the tables above hold their numbers)")
    return written + figures


if __name__ == "__main__":
    main()
