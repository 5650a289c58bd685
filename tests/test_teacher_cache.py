"""The teacher cache: rows equal to the live teacher's, a cached run is the same run (fp32 and bf16,
the demo and real tweets), no teacher loaded when complete, damaged/incomplete/other-key caches
rebuilt, kill -9 while writing, auto|on|off, torchrun."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TSM, XLMR_TOKENIZER, requires_shared
from test_distributed import _assert_same_weights, _finish, _torchrun
from xlmr_mini import kd_loss, kd_step, run_setup, step_impl, teacher_cache
from xlmr_mini.checkpoint import build_model, save_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import scratch_state_dict
from xlmr_mini.data import EncodedSplit, build_demo, epoch_batches
from xlmr_mini.demo_models import demo_architecture
from xlmr_mini.kd_step import bf16_frozen_linears, run_teacher
from xlmr_mini.model import Taps
from xlmr_mini.teacher_cache import CacheSpec, TeacherCache
from xlmr_mini.train import main, run_seed
from xlmr_mini.train_config import parse_config


@pytest.fixture(scope="module")
def teacher(cache, tmp_path_factory) -> Path:
    """A random 2-layer teacher on the demo's vocabulary and labels, dropout 0.1: its students train
    with dropout, so a cached run must also draw the same dropout masks."""
    task = build_demo(cache)
    cfg = demo_architecture(task).replace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128)
    out = tmp_path_factory.mktemp("teacher")
    save_hf(out, cfg, scratch_state_dict(cfg, 0), task.tokenizer_path)
    return out


def _args(teacher: Path, cache: Path, out: Path, *flags: str, steps: int = 8) -> list[str]:
    return ["--init", "from-teacher", "--teacher", str(teacher), "--layers", "1", "--max-steps", str(steps),
            "--eval-steps", "4", "--batch-size", "16", "--cache-dir", str(cache), "--num-threads", "1",
            "--out", str(out), *flags]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def _no_teacher(*args, **kwargs):
    raise AssertionError("the teacher was loaded although its cache is complete")


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------
def _tiny_teacher(bf16: bool):
    cfg = XLMRConfig(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                     intermediate_size=40, max_position_embeddings=40, id2label=("a", "b", "c"))
    model = build_model(cfg, scratch_state_dict(cfg, 3)).eval().requires_grad_(False)
    return bf16_frozen_linears(model) if bf16 else model


def _split(lengths: list[int]) -> EncodedSplit:
    rng = np.random.default_rng(0)
    tokens = [np.concatenate([[0], rng.integers(3, 50, n - 2), [2]]).astype(np.int32) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return EncodedSplit(np.concatenate(tokens), offsets, np.zeros(len(lengths), dtype=np.int64), ["x"] * len(lengths))


def _spec(taps: Taps, bf16: bool) -> CacheSpec:
    return CacheSpec(teacher="t", split="s", taps=taps, precision="bf16" if bf16 else "fp32", device="cpu",
                     hidden=24, heads=3, labels=3)


TAPS = {"probs": Taps(layers=(0, 2), embeddings=True, hidden=True, probs=True),
        "scores": Taps(layers=(1,), embeddings=True, hidden=True, scores=True),
        "qk": Taps(layers=(0, 1, 2), embeddings=True, hidden=True, qk=True)}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("taps", TAPS, ids=list(TAPS))
def test_cached_rows_are_the_live_teachers_outputs(taps, bf16, tmp_path):
    """Read back in a batch of other examples and padding than the build's, every tapped tensor
    has the live teacher's dtype, shape and values at real positions (within float rounding: the
    padding changes the kernels' blocking), and zeros at padded positions."""
    teacher, enc, spec = _tiny_teacher(bf16), _split([2, 7, 3, 29, 5, 13, 33]), _spec(TAPS[taps], bf16)
    dtypes = teacher_cache.field_dtypes(spec, "cpu")
    teacher_cache.build(tmp_path / "c", spec, enc, dtypes, teacher, pad_id=1, device="cpu")
    assert teacher_cache.problem(tmp_path / "c", spec, enc.lengths, dtypes) is None
    assert sum(f.stat().st_size for f in (tmp_path / "c").glob("*.bin")) == teacher_cache.cache_bytes(
        spec, enc.lengths, dtypes)
    reader = TeacherCache(tmp_path / "c", spec, enc.lengths, dtypes)
    batch = epoch_batches(enc, 4, seed=5, epoch=1, pad_id=1)[0]
    mask = batch["attention_mask"]
    live = run_teacher(teacher, spec.taps, batch["input_ids"], mask, bf16)
    read = reader.read(batch["index"], mask.shape[1], "cpu")
    torch.testing.assert_close(read.logits, live.logits, atol=0 if not bf16 else 2e-2, rtol=1e-5)
    for field in spec.fields()[1:]:
        got, want = getattr(read, field), getattr(live, field)
        got, want = (got, want) if isinstance(got, list) else ([got], [want])
        assert len(got) == len(want) and len(got) > 0
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape, field
            real = _real_positions(field, mask)
            torch.testing.assert_close(g[real], w[real], atol=1e-6 if not bf16 else 2e-2, rtol=1e-5 if not bf16 else 2e-2)
            assert not g[~real].any(), field


def _real_positions(field: str, mask: torch.Tensor) -> torch.Tensor:
    m = mask.bool()
    if field in ("embeddings", "hidden"):
        return m[:, :, None].expand(-1, -1, 24)
    if field in ("q", "k"):
        return m[:, None, :, None].expand(-1, 3, -1, 8)
    return (m[:, :, None] & m[:, None, :])[:, None].expand(-1, 3, -1, -1)


def test_damaged_incomplete_and_other_key_caches_are_rebuilt_with_one_line(tmp_path, capsys):
    teacher, enc, spec = _tiny_teacher(False), _split([4, 9, 6]), _spec(TAPS["probs"], False)
    path = tmp_path / spec.key

    def open_cache():
        return teacher_cache.open_cache(path, spec, enc, "cpu", "on", True, lambda: teacher, pad_id=1)

    reference = open_cache().read(torch.tensor([0, 1, 2]), 9, "cpu")
    assert "computing the teacher's outputs for 3 examples" in capsys.readouterr().out
    damages = {"damaged (hidden.bin": lambda: (path / "hidden.bin").write_bytes(b"\0" * 10),
               "incomplete (no readable meta.json)": lambda: (path / "meta.json").unlink(),
               "built for another key": lambda: (path / "meta.json").write_text(
                   (path / "meta.json").read_text().replace(spec.key, "0" * 32))}
    for expected, damage in damages.items():
        damage()
        read = open_cache().read(torch.tensor([0, 1, 2]), 9, "cpu")
        lines = [line for line in capsys.readouterr().out.splitlines() if "rebuilding" in line]
        assert len(lines) == 1 and expected in lines[0], lines
        torch.testing.assert_close(read.probs[0], reference.probs[0], atol=0, rtol=0)
    stale = tmp_path / f".{spec.key}.999999999.tmp"  # a build whose process is gone
    stale.mkdir()
    (path / "meta.json").unlink()
    open_cache()
    assert not stale.exists() and "incomplete build" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_with_the_cache_is_the_same_run(precision, teacher, cache, tmp_path, monkeypatch, capsys):
    """Losses and scores with the cache (built by a first run, read by a second that never loads the
    teacher) equal the live teacher's within float rounding."""
    flags = ("--precision", precision, "--teacher-cache-dir", str(tmp_path / "tc"))
    live = main(_args(teacher, cache, tmp_path / "live", *flags, "--teacher-cache", "off"))
    built = main(_args(teacher, cache, tmp_path / "built", *flags, "--teacher-cache", "on"))
    assert "computing the teacher's outputs" in capsys.readouterr().out
    monkeypatch.setattr(run_setup, "load_teacher", _no_teacher)
    read = main(_args(teacher, cache, tmp_path / "read", *flags))  # auto: a complete cache is used
    assert "teacher cache" not in capsys.readouterr().out
    tol = dict(rtol=1e-5, atol=1e-7) if precision == "fp32" else dict(rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(_losses(tmp_path / "built"), _losses(tmp_path / "live"), **tol)
    assert _losses(tmp_path / "read") == _losses(tmp_path / "built")  # the same cache, the same numbers
    for result in (built, read):
        for key in ("micro_f1", "macro_f1"):
            assert result["final"]["overall"][key] == pytest.approx(live["final"]["overall"][key], abs=0.01)


def test_kill_9_while_writing_then_the_same_command_gives_the_same_numbers(teacher, cache, tmp_path):
    args = _args(teacher, cache, tmp_path / "run", "--teacher-cache", "on", "--teacher-cache-dir", str(tmp_path / "tc"))
    killed = textwrap.dedent(f"""
        import os, signal, sys
        from xlmr_mini import teacher_cache
        from xlmr_mini.train import main
        write = teacher_cache._write
        def write_then_die(tmp, *a, **kw):
            write(tmp, *a, **kw)  # every row written, meta.json not yet
            os.kill(os.getpid(), signal.SIGKILL)
        teacher_cache._write = write_then_die
        main({args!r})
    """)
    proc = subprocess.run([sys.executable, "-c", killed], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in (tmp_path / "tc").iterdir()] == [p.name for p in (tmp_path / "tc").glob(".*.tmp")]
    main(args)  # the same command
    main(_args(teacher, cache, tmp_path / "whole", "--teacher-cache", "on", "--teacher-cache-dir",
               str(tmp_path / "tc2")))
    assert _losses(tmp_path / "run") == _losses(tmp_path / "whole")
    assert not list((tmp_path / "tc").glob(".*.tmp"))


def test_auto_says_why_it_is_off_and_on_that_cannot_be_kept_is_bad_input(teacher, cache, tmp_path, monkeypatch,
                                                                          capsys):
    tc = ("--teacher-cache-dir", str(tmp_path / "tc"))
    main(_args(teacher, cache, tmp_path / "once", *tc))  # 8 steps of batch 16: less than one epoch
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("teacher cache")]
    assert lines == ["teacher cache: off (the run reads the training data once and shares its teacher with no other "
                     "run; --teacher-cache on keeps the teacher's outputs for later runs)"]
    assert not (tmp_path / "tc").exists()
    main(_args(teacher, cache, tmp_path / "tinybert", *tc, "--loss-norm", "tinybert", "--seed", "1", "2"))
    assert "teacher cache: off (--loss-norm tinybert reads the teacher at padded positions" in capsys.readouterr().out
    monkeypatch.setattr(teacher_cache, "free_bytes", lambda path: 1000)
    main(_args(teacher, cache, tmp_path / "full-disk", *tc, "--seed", "1", "2"))
    assert "MB, more than 50% of the 0.0 MB free in" in capsys.readouterr().out
    for name, flags, expected in (("full", ("--seed", "1", "2"), "--teacher-cache on: the teacher cache needs"),
                                  ("tinybert-on", ("--loss-norm", "tinybert"), "--teacher-cache on: --loss-norm tinybert")):
        with pytest.raises(SystemExit) as e:
            main(_args(teacher, cache, tmp_path / name, *tc, "--teacher-cache", "on", *flags))
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "tc").exists()


@pytest.mark.parametrize("fused_ok", [True, False])
def test_the_fused_check_runs_the_live_teacher_then_training_reads_the_cache(fused_ok, teacher, cache, tmp_path,
                                                                               monkeypatch, capsys):
    """--kd-impl auto's check compares the fused loss with the reference on the live teacher; then
    the run reads the cache, which holds the fused loss's taps (Q and K). If the check falls back to
    the reference, the cache's taps no longer serve: the run says so and keeps the live teacher."""
    for path in (cache / "hardware").glob("kd-step-check-*.json"):
        path.unlink()
    monkeypatch.setattr(step_impl, "fused_device", lambda device: True)  # the kernels through Triton's interpreter
    if not fused_ok:
        mse = kd_loss.attention_prob_mse
        monkeypatch.setattr(kd_loss, "attention_prob_mse", lambda *a: mse(*a) + 0.01)
    calls = []
    live = kd_step.run_teacher
    monkeypatch.setattr(kd_step, "run_teacher", lambda *a: calls.append(1) or live(*a))
    short = ("--max-length", "24", "--teacher-cache-dir", str(tmp_path / "tc"))  # short: interpreted kernels
    result = main(_args(teacher, cache, tmp_path / "run", *short, "--teacher-cache", "on", steps=3))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("teacher cache")]
    assert result["kd_impl"]["used"] == ("fused" if fused_ok else "reference")
    if fused_ok:
        assert len(calls) == 2  # the check's two loss forms; every step read the cache
        assert said == [line for line in said if line.startswith("teacher cache: computing")]
    else:
        assert len(calls) == 2 + 3  # and the live teacher for each step
        assert said[-1] == "teacher cache: off (it holds the fused loss's taps, and the run fell back to the reference)"
        monkeypatch.undo()
        main(_args(teacher, cache, tmp_path / "ref", *short, "--teacher-cache", "off", "--kd-impl", "reference",
                   steps=3))
        assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")


def test_the_cache_stage_builds_where_it_fits_and_otherwise_leaves_the_students_live(teacher, cache, tmp_path,
                                                                                      monkeypatch, capsys):
    """`cache_teacher` (the study's stage) under auto: built for the students to share; where it
    does not fit half the free disk, one line, a cache.json saying so, exit 0 (each student then
    says why it runs live); `on` that cannot fit is bad input."""
    from xlmr_mini import cache_teacher
    flags = _args(teacher, cache, tmp_path / "stage", "--teacher-cache-dir", str(tmp_path / "tc"))
    built = cache_teacher.main(flags)
    assert built["cache"] is not None and (tmp_path / "stage" / "cache.json").is_file()
    monkeypatch.setattr(teacher_cache, "free_bytes", lambda path: 1000)
    skipped = cache_teacher.main(_args(teacher, cache, tmp_path / "small", "--teacher-cache-dir", str(tmp_path / "tc2")))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("teacher cache")]
    assert skipped["cache"] is None and json.loads((tmp_path / "small" / "cache.json").read_text())["cache"] is None
    assert said[-1].startswith("teacher cache: off (it needs ") and "of the 0.0 MB free in" in said[-1]
    assert not (tmp_path / "tc2").exists()
    with pytest.raises(SystemExit) as e:
        cache_teacher.main(_args(teacher, cache, tmp_path / "on", "--teacher-cache-dir", str(tmp_path / "tc2"),
                                 "--teacher-cache", "on"))
    assert e.value.code == 2 and "--teacher-cache on: the teacher cache needs" in capsys.readouterr().err


def test_under_torchrun_rank_0_builds_and_each_rank_reads_its_rows(teacher, cache, tmp_path):
    # No dropout: each process would draw masks for its own rows (see test_distributed).
    common = ("--hidden", "32", "--teacher-cache-dir", str(tmp_path / "tc"), "--dropout", "0", "--attention-dropout", "0",
              "--keep-checkpoint")
    main(_args(teacher, cache, tmp_path / "one", *common, "--teacher-cache", "off"))
    code, out = _finish(_torchrun(_args(teacher, cache, tmp_path / "two", *common, "--teacher-cache", "on"),
                                  uuid.uuid4().hex))
    assert code == 0, out[-3000:]
    assert out.count("computing the teacher's outputs") == 1
    _assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-6)
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)


@requires_shared("data", "tweet_sentiment_multilingual")
@requires_shared("tokenizers", "xlm-roberta", "tokenizer.json")
def test_real_tweets_with_the_cache_are_the_same_run(cache, tmp_path):
    """A random 2-layer teacher over XLM-R's real vocabulary, length-bucketed batches of real tweets:
    fp32 and bf16 runs, live and cached (the data prepared once for the four)."""
    cfg = XLMRConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=130, id2label=("negative", "neutral", "positive"))
    save_hf(tmp_path / "teacher", cfg, scratch_state_dict(cfg, 0), XLMR_TOKENIZER)
    run = parse_config(["--init", "from-teacher", "--teacher", str(tmp_path / "teacher"), "--data", f"tsm:{TSM}",
                        "--subset", "0.02", "--max-length", "32", "--max-steps", "12", "--eval-steps", "12",
                        "--cache-dir", str(cache), "--num-threads", "1", "--eval-batch-size", "256",
                        "--teacher-cache-dir", str(tmp_path / "tc")])
    setup = run_setup.prepare(run)
    for precision, tol in (("fp32", dict(rtol=1e-5, atol=1e-7)), ("bf16", dict(rtol=2e-3, atol=1e-4))):
        results = {}
        for mode in ("off", "on"):
            out = tmp_path / f"{precision}-{mode}"
            out.mkdir()
            cfg = dataclasses.replace(run, precision=precision, teacher_cache=mode)
            results[mode] = run_seed(cfg, setup, 42, out, torch.device("cpu"))
        np.testing.assert_allclose(_losses(tmp_path / f"{precision}-on"), _losses(tmp_path / f"{precision}-off"), **tol)
        for key in ("micro_f1", "macro_f1"):
            assert results["on"]["final"]["overall"][key] == pytest.approx(results["off"]["final"]["overall"][key],
                                                                         abs=0.01)
    assert len(list((tmp_path / "tc").iterdir())) == 2  # one cache per precision
