"""Fine-tune a teacher, or initialize a student and train it with or without distillation.

    python -m xlmr_mini.train --init from-teacher                 # the built-in demo, a few minutes
    python -m xlmr_mini.train --init from-base --base XLMR_DIR --layers 12 --no-kd --data tsm:PATH
    python -m xlmr_mini.train --init from-teacher --teacher TEACHER_DIR --layers 6 --data tsm:PATH

One run = one seed: initialize (paper §2.2), train with `kd_loss` (§2.1) or cross-entropy only
(`--no-kd`), evaluate on dev every `--eval-steps`, keep the best in `best/` (an HF directory), and
finally score it on test (dev if the data has no test split). With several `--seeds` each seed
gets `seed-N/` and the top results.json holds the mean and spread.

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
from xlmr_mini.data import epoch_batches, load_task
from xlmr_mini.demo_models import demo_architecture, demo_teacher
from xlmr_mini.errors import InputError, cli_main
from xlmr_mini.hardware import resolve_device
from xlmr_mini.inference import evaluate
from xlmr_mini.kd_step import TrainingError, train_step
from xlmr_mini.metrics import metric_key
from xlmr_mini.progress import Progress
from xlmr_mini.results import finish_seed, report
from xlmr_mini.files import check_apart
from xlmr_mini.run_dir import (MetricsLog, claim_out, default_out, load_checkpoint, metrics_writer, rng_state,
                               save_best, save_checkpoint, seed_dirs)
from xlmr_mini.run_identity import input_paths, run_identity
from xlmr_mini.run_setup import Setup, build_context, check_inputs, demo_banner, prepare
from xlmr_mini.tokenizer import Tokenizer
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


def run_seed(cfg: TrainConfig, setup: Setup, seed: int, out: Path, device) -> dict:
    """Train one seed into `out`; returns its results (also written to results.json)."""
    started = time.time()
    train_enc = setup.splits["train"]
    pad_id = Tokenizer(setup.tokenizer_file).pad_id
    steps_per_epoch = len(epoch_batches(train_enc, cfg.batch_size, seed=seed, epoch=0, pad_id=pad_id))
    total = cfg.max_steps or setup.epochs * steps_per_epoch
    eval_every = cfg.eval_steps or steps_per_epoch
    ctx = build_context(cfg, setup, seed, device, total)
    prog = Progression()
    if cfg.resume and (out / "checkpoint").exists():
        prog = Progression(**load_checkpoint(out / "checkpoint", ctx, device, distributed.rank(),
                                             distributed.world_size()))
    log = distributed.on_main(metrics_writer, out / "metrics.jsonl", keep_through=prog.step) or MetricsLog(None)
    world = distributed.world_size()
    bar = Progress(total, start=prog.step, label=f"seed {seed}" + (f", {world} processes" if world > 1 else ""),
                   stream=None if distributed.is_main() else io.StringIO())
    limit = min(total, cfg.stop_after or total)
    try:
        while prog.step < limit:
            epoch, k = divmod(prog.step, steps_per_epoch)
            batches = epoch_batches(train_enc, cfg.batch_size, seed=seed, epoch=epoch, pad_id=pad_id)
            for batch in batches[k:]:
                _one_step(cfg, setup, ctx, prog, batch, out, log, bar, eval_every, total, epoch, device)
                if prog.step >= limit:
                    break
        if prog.step < total:
            _save_checkpoint(out, ctx, prog)
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
    return finish_seed(cfg, setup, seed, out, device, prog, time.time() - started, "bf16" if ctx.bf16 else "fp32")


def _one_step(cfg, setup, ctx, prog, batch, out, log, bar, eval_every, total, epoch, device) -> None:
    started = time.perf_counter()
    lr_used = ctx.optimizer.param_groups[0]["lr"]
    share, real = distributed.shard_batch(batch)  # the whole batch on one process
    values = train_step(ctx, share, device, real)
    prog.step += 1
    prog.untouched_scale *= 1.0 - lr_used * cfg.weight_decay
    lr = ctx.scheduler.get_last_lr()[0]
    rate = len(batch["labels"]) / max(time.perf_counter() - started, 1e-9)  # the global batch's samples
    log.write({"type": "train", "step": prog.step, "epoch": epoch, "lr": lr, "world_size": distributed.world_size(),
               "samples_per_s": round(rate, 1), **values})
    bar.update(prog.step, values["loss"])
    if prog.step % eval_every == 0 or prog.step == total:
        _evaluate_dev(cfg, setup, ctx, prog, out, log, device)
        _save_checkpoint(out, ctx, prog)


def _save_checkpoint(out: Path, ctx, prog: Progression) -> None:
    rng = distributed.all_gather(rng_state())  # every rank's, so each resumes its own dropout draws
    distributed.on_main(save_checkpoint, out / "checkpoint", ctx, dataclasses.asdict(prog), rng)


def _evaluate_dev(cfg, setup, ctx, prog, out, log, device) -> None:
    # setup.splits["dev"] holds only the selection languages (--select-on).
    scores = evaluate(ctx.student, setup.splits["dev"], cfg.eval_batch_size, setup.task.unseen, ctx.bf16)
    score = scores["overall"][metric_key(cfg.metric)]
    improved = score > prog.best_score
    if improved:
        prog.best_score, prog.best_step = score, prog.step
        distributed.on_main(save_best, out / "best", ctx, setup.tokenizer_file, cfg.save_vocab, prog.untouched_scale)
    prog.last_eval_step = prog.step
    log.write({"type": "eval", "split": "dev", "step": prog.step, "metric": cfg.metric, "best": improved,
               "languages": scores.pop("languages"), **scores})


def train(cfg: TrainConfig, arch: XLMRConfig | None = None, quiet: bool = False) -> dict:
    """Run every seed of `cfg`; returns the results (one seed's, or the summary of several)."""
    threads = torch.get_num_threads()
    if cfg.num_threads or cfg.is_demo:
        torch.set_num_threads(cfg.num_threads or DEMO_THREADS)
    device, joined = distributed.init(resolve_device(cfg.device), cfg.dist_timeout)  # under torchrun
    main_rank = distributed.is_main()
    try:
        with contextlib.ExitStack() as stack:
            if not main_rank:  # only rank 0 prints
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            return _train(cfg, device, arch, quiet or not main_rank)
    finally:
        torch.set_num_threads(threads)
        if joined:
            distributed.shutdown()


def _train(cfg: TrainConfig, device, arch: XLMRConfig | None, quiet: bool) -> dict:
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
            runs.append(run_seed(cfg, setup, seed, run_dir, device))
            if "stopped_at" in runs[-1]:
                break
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
