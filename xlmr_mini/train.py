"""Fine-tune a teacher, or initialize a student and train it with or without distillation.

    python -m xlmr_mini.train --init from-teacher                 # the built-in demo, a few minutes
    python -m xlmr_mini.train --init from-base --base XLMR_DIR --layers 12 --no-kd --data tsm:PATH
    python -m xlmr_mini.train --init from-teacher --teacher TEACHER_DIR --layers 6 --data tsm:PATH

One run = one seed: initialize (paper §2.2), train with `kd_loss` (§2.1) or cross-entropy only
(`--no-kd`), evaluate on dev every `--eval-steps`, keep the best in `best/` (an HF directory), and
finally score it on test (dev if the data has no test split). With several seeds (`--seed 1 2 3`)
each seed gets `seed-N/`, the top results.json holds the mean and spread, and the best seed's
model on dev is copied to the top `best/`.

Under torchrun (`torchrun --nproc_per_node N -m xlmr_mini.train ...`) the same loop runs on every
process with DDP: each takes its share of every global batch, and only rank 0 prints and writes
(`distributed`).

This file is the loop and the orchestration; its parts live beside it: `train_config` (the flags),
`run_setup` (data, models, step context), `kd_step` (one optimizer step), `run_dir` (checkpoints,
metrics.jsonl, out-dir claims), `results` (scores, summaries), `demo_models` (the demo's teacher).
"""
import contextlib
import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from xlmr_mini import distributed
from xlmr_mini.config import XLMRConfig
from xlmr_mini.data import default_cache_dir, epoch_batches, load_task
from xlmr_mini.demo_models import demo_architecture, demo_teacher
from xlmr_mini.errors import InputError, cli_main
from xlmr_mini.hardware import deterministic_algorithms, resolve_device
from xlmr_mini.inference import evaluate
from xlmr_mini.kd_step import StepContext, TrainingError, train_step
from xlmr_mini.metrics import metric_key
from xlmr_mini.progress import Progress
from xlmr_mini.results import best_seed, finish_seed, report
from xlmr_mini.files import check_apart
from xlmr_mini.run_dir import (MetricsLog, claim_out, default_out, load_checkpoint, metrics_writer, publish_best,
                               remove_checkpoint, rng_state, save_best, save_checkpoint, seed_dirs)
from xlmr_mini.run_identity import input_paths, run_identity
from xlmr_mini.run_setup import (Setup, build_context, check_inputs, demo_banner, prepare, resolve_run_precision,
                                 settle_teacher)
from xlmr_mini.step_impl import check_step, plan_step
from xlmr_mini.train_config import DEMO_THREADS, TrainConfig, parse_config


@dataclasses.dataclass
class Progression:
    """Where a run is; saved in the checkpoint."""

    step: int = 0
    best_score: float = -1.0  # the best dev score so far, in --metric
    best_step: int = 0
    last_eval_step: int = 0
    # What AdamW's weight decay has made of a parameter with zero gradient (untrained vocabulary
    # rows): the product of (1 - lr_t * wd) over the steps taken.
    untouched_scale: float = 1.0
    # The training records of the steps since the last one written (--logging-steps): their sums.
    window: dict = dataclasses.field(default_factory=dict)
    window_steps: int = 0


@dataclasses.dataclass
class Loop:
    """What every step of one seed's loop shares."""

    cfg: TrainConfig
    setup: Setup
    ctx: StepContext
    prog: Progression
    out: Path
    log: MetricsLog
    bar: Progress
    eval_every: int
    save_every: int
    total: int
    device: object


def run_seed(cfg: TrainConfig, setup: Setup, seed: int, out: Path, device, label: str | None = None) -> dict:
    """Train one seed into `out`; returns its results (also written to results.json). `label`
    names the run on its progress lines (default: the seed)."""
    started = time.time()
    train_enc = setup.splits["train"]
    pad_id = setup.tokenizer.pad_id
    steps_per_epoch = len(_epoch(cfg, train_enc, seed, 0, pad_id))
    total = cfg.max_steps or setup.epochs * steps_per_epoch
    eval_every = cfg.eval_steps or steps_per_epoch
    plan = plan_step(cfg.kd_impl, cfg.compile, device, not cfg.no_kd, cfg.loss_norm)
    ctx = build_context(cfg, setup, seed, device, total, plan)
    prog = Progression()
    if cfg.resume and (out / "checkpoint").exists():
        prog = Progression(**load_checkpoint(out / "checkpoint", ctx, device, distributed.rank(),
                                             distributed.world_size()))
    limit = min(total, cfg.stop_after or total)
    if prog.step < limit:  # the self-check of what --kd-impl / --compile auto chose, on the batch training starts with
        epoch, k = divmod(prog.step, steps_per_epoch)
        first = _epoch(cfg, train_enc, seed, epoch, pad_id)[k]
        plan = check_step(ctx, plan, distributed.shard_batch(first)[0], device, cfg.cache_dir or default_cache_dir(),
                          limit - prog.step)
    settle_teacher(ctx)
    log = distributed.on_main(metrics_writer, out / "metrics.jsonl", keep_through=prog.step,
                              tensorboard=cfg.report_to == "tensorboard") or MetricsLog(None)
    world = distributed.world_size()
    label = label or f"seed {seed}"
    bar = Progress(total, start=prog.step, label=label + (f", {world} processes" if world > 1 else ""),
                   stream=None if distributed.is_main() else io.StringIO())
    loop = Loop(cfg, setup, ctx, prog, out, log, bar, eval_every, cfg.save_steps or eval_every, total, device)
    try:
        while prog.step < limit:
            epoch, k = divmod(prog.step, steps_per_epoch)
            for batch in _epoch(cfg, train_enc, seed, epoch, pad_id)[k:]:
                _one_step(loop, batch, epoch)
                if prog.step >= limit:
                    break
        if prog.step < total:
            _save_checkpoint(out, ctx, prog, device)
            bar.close(f"stopped at step {prog.step} of {total} (--stop-after); continue with --resume")
            return {"stopped_at": prog.step}
    except TrainingError as e:
        bar.close("diverged")
        kept = out / "checkpoint"
        ckpt = f"the last good checkpoint is kept in {kept}" if kept.exists() else "no checkpoint was written yet"
        raise TrainingError(f"seed {seed}, step {prog.step + 1}: {e}; {ckpt}. "
                            f"Try a lower --lr or --precision fp32.") from None
    finally:
        log.close()
    bar.close()
    results = finish_seed(cfg, setup, seed, out, device, prog, time.time() - started, cfg.precision,
                          plan.record())
    if not cfg.keep_checkpoint:
        distributed.on_main(remove_checkpoint, out / "checkpoint")
    return results


def _epoch(cfg: TrainConfig, train_enc, seed: int, epoch: int, pad_id: int):
    return epoch_batches(train_enc, cfg.batch_size, seed=seed, epoch=epoch, pad_id=pad_id,
                         group_by_length=cfg.group_by_length)


def _one_step(loop: Loop, batch: dict, epoch: int) -> None:
    cfg, ctx, prog = loop.cfg, loop.ctx, loop.prog
    started = time.perf_counter()
    lr_used = ctx.optimizer.param_groups[0]["lr"]
    share, real = distributed.shard_batch(batch)  # the whole batch on one process
    values = train_step(ctx, share, loop.device, real, cfg.grad_accum)
    prog.step += 1
    prog.untouched_scale *= 1.0 - lr_used * cfg.weight_decay
    rate = len(batch["labels"]) / max(time.perf_counter() - started, 1e-9)  # the global batch's samples
    prog.window = _add(prog.window, {"samples_per_s": rate, **values})
    prog.window_steps += 1
    if prog.window_steps == cfg.logging_steps or prog.step == loop.total:
        mean = _mean(prog.window, prog.window_steps)
        loop.log.write({"type": "train", "step": prog.step, "epoch": epoch, "lr": ctx.scheduler.get_last_lr()[0],
                        "world_size": distributed.world_size(), "logged_steps": prog.window_steps,
                        **mean, "samples_per_s": round(mean["samples_per_s"], 1)})
        prog.window, prog.window_steps = {}, 0
    loop.bar.update(prog.step, values["loss"])
    # The last step is evaluated off the --eval-steps grid only with --eval-last-step, or when the
    # run has had no evaluation at all (there must be a best model to report).
    last = prog.step == loop.total
    if prog.step % loop.eval_every == 0 or (last and (cfg.eval_last_step or prog.last_eval_step == 0)):
        _evaluate_dev(loop)
    # A finished run's checkpoint is written only to be kept (--keep-checkpoint).
    if prog.step % loop.save_every == 0 or (last and cfg.keep_checkpoint):
        _save_checkpoint(loop.out, ctx, prog, loop.device)


def _add(sums: dict, values: dict) -> dict:
    """`sums` plus `values`, key by key (nested dicts too)."""
    return {k: _add(sums.get(k, {}), v) if isinstance(v, dict) else sums.get(k, 0.0) + v for k, v in values.items()}


def _mean(sums: dict, n: int) -> dict:
    return {k: _mean(v, n) if isinstance(v, dict) else v / n for k, v in sums.items()}


def _save_checkpoint(out: Path, ctx, prog: Progression, device) -> None:
    rng = distributed.all_gather(rng_state(device))  # every rank's, so each resumes its own dropout draws
    distributed.on_main(save_checkpoint, out / "checkpoint", ctx, dataclasses.asdict(prog), rng)


def _evaluate_dev(loop: Loop) -> None:
    cfg, setup, ctx, prog = loop.cfg, loop.setup, loop.ctx, loop.prog
    # setup.splits["dev"] holds only the selection languages (--select-on).
    scores = evaluate(ctx.student, setup.splits["dev"], cfg.eval_batch_size, setup.task.unseen, ctx.bf16)
    score = scores["overall"][metric_key(cfg.metric)]
    improved = score > prog.best_score
    if improved:
        prog.best_score, prog.best_step = score, prog.step
        distributed.on_main(save_best, loop.out / "best", ctx, setup.tokenizer_file, cfg.save_vocab,
                            prog.untouched_scale)
    prog.last_eval_step = prog.step
    overall = scores["overall"]
    loop.bar.note(f"step {prog.step}/{loop.total}: dev micro-F1 {100 * overall['micro_f1']:.2f}%, macro-F1 "
                  f"{100 * overall['macro_f1']:.2f}%" + (" (best so far)" if improved else
                                                          f" (best {100 * prog.best_score:.2f}% at step {prog.best_step})"))
    loop.log.write({"type": "eval", "split": "dev", "step": prog.step, "metric": cfg.metric, "best": improved,
                    "languages": scores.pop("languages"), **scores})


def train(cfg: TrainConfig, arch: XLMRConfig | None = None, quiet: bool = False, label: str | None = None) -> dict:
    """Run every seed of `cfg`; returns the results (one seed's, or the summary of several).
    `label` names the run on its progress lines (default: the seed)."""
    threads = torch.get_num_threads()
    if cfg.num_threads or cfg.is_demo:
        torch.set_num_threads(cfg.num_threads or DEMO_THREADS)
    device, joined = distributed.init(resolve_device(cfg.device), cfg.dist_timeout)  # under torchrun
    main_rank = distributed.is_main()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(deterministic_algorithms(cfg.deterministic))
            if not main_rank:  # only rank 0 prints
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            return _train(cfg, device, arch, quiet or not main_rank, label)
    finally:
        torch.set_num_threads(threads)
        if joined:
            distributed.shutdown()


def _train(cfg: TrainConfig, device, arch: XLMRConfig | None, quiet: bool, label: str | None) -> dict:
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    check_apart("--out", out, input_paths(cfg))  # before anything is written or cleared
    teacher = None
    needs_teacher = cfg.init == "from-teacher" or not cfg.no_kd
    if cfg.is_demo and cfg.teacher is None and arch is None and needs_teacher:
        if not quiet:
            print(demo_banner())
        check_inputs(cfg)
        teacher = demo_teacher(cfg, train)
    elif cfg.is_demo and arch is None and cfg.teacher is None and cfg.base is None:
        arch = demo_architecture(load_task("demo", cache_dir=cfg.cache_dir))  # from-scratch takes its sizes
    setup = prepare(cfg, teacher_dir=teacher, arch=arch)
    cfg = resolve_run_precision(cfg, setup, device)
    claim = distributed.on_main(lambda: claim_out(cfg, out, run_identity(cfg, setup.teacher_dir)))
    work, finished = distributed.all_gather((claim.work, claim.finished) if claim else None)[0]
    try:
        if finished and not quiet:
            print(f"{out}: holds this run, finished; its results follow (pass --overwrite to train it again)")
        runs = []
        for seed, run_dir in seed_dirs(cfg, work):
            done = run_dir / "results.json"
            if done.is_file():  # this run's seed (claim_out compared the identity), finished before
                runs.append(json.loads(done.read_text(encoding="utf-8")))
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            seed_label = label and (f"{label}, seed {seed}" if len(cfg.seeds) > 1 else label)
            runs.append(run_seed(cfg, setup, seed, run_dir, device, seed_label))
            if "stopped_at" in runs[-1]:
                break
        if len(runs) > 1 and not finished and "stopped_at" not in runs[-1]:
            # the best seed on dev, where a single run's model would be
            distributed.on_main(publish_best, work / f"seed-{best_seed(runs)}" / "best", work / "best")
        distributed.on_main(lambda: claim.finish())
    finally:
        if claim is not None:
            claim.release()
    return runs[-1] if "stopped_at" in runs[-1] else report(cfg, setup, out, runs, quiet)


@cli_main
def main(argv=None) -> dict:
    try:
        return train(parse_config(argv))
    except TrainingError as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        raise SystemExit(1)
    except distributed.PeerLost as e:
        print(f"error: training stopped: {e}. Rerun the same command with --resume to continue from the last "
              f"checkpoint.", file=sys.stderr)
        raise SystemExit(1)
    except InputError:
        if os.environ.get("RANK", "0") != "0":  # under torchrun every rank sees the same bad input: rank 0 says it
            raise SystemExit(2)
        raise


if __name__ == "__main__":
    main()
