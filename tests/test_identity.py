"""A run is what determines it (settings and input content), not its paths; an --out that holds an
input is refused; a finished run is kept; --overwrite replaces a run only once the new one is
complete; a run directory is locked while written."""
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import tiny_demo_model
from xlmr_mini.data import build_demo
from xlmr_mini.files import file_sha256
from xlmr_mini.kd_step import TrainingError
from xlmr_mini.run_dir import claim_out
from xlmr_mini.run_identity import run_identity
from xlmr_mini.train import main
from xlmr_mini.train_config import parse_config


@pytest.fixture(scope="module")
def teacher_src(cache, tmp_path_factory) -> Path:
    return tiny_demo_model(cache, tmp_path_factory.mktemp("teacher") / "best")


@pytest.fixture
def teacher(teacher_src, tmp_path) -> Path:
    """A private copy: tests move it or put it inside an --out."""
    return Path(shutil.copytree(teacher_src, tmp_path / "teacher"))


def _argv(teacher: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--teacher", str(teacher), "--layers", "1", "--max-steps", "2", "--out", str(out), "--cache-dir",
            str(cache), "--num-threads", "1", *extra]


def _demo_file(cache: Path, path: Path) -> Path:
    """The demo's train/dev/test as one jsonl file (a `file:` dataset that a test can change)."""
    task = build_demo(cache)
    with open(path, "w", encoding="utf-8") as f:
        for name, split in task.splits.items():
            for i in range(0, len(split), 10):
                f.write(json.dumps({"text": split.texts[i], "label": task.labels[split.labels[i]],
                                    "lang": split.langs[i], "split": name}) + "\n")
    return path


def _state(out: Path) -> dict:
    """Each file of a run directory -> (size, mtime): what a rerun must leave alone."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


def _one_line_exit_2(capsys, argv: list[str], expect: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and expect in err, err
    return err


# --- 2. identity by content ------------------------------------------------------------------
def test_a_moved_teacher_keeps_the_run_done(teacher, cache, tmp_path, capsys):
    out = tmp_path / "run"
    main(_argv(teacher, out, cache))
    before = _state(out)
    moved = Path(shutil.move(teacher, tmp_path / "elsewhere"))
    capsys.readouterr()
    result = main(_argv(moved, out, cache))
    assert "holds this run, finished" in capsys.readouterr().out
    assert result["steps"] == 2 and _state(out) == before


def test_data_changed_in_place_is_another_run(teacher, cache, tmp_path, capsys):
    data = _demo_file(cache, tmp_path / "d.jsonl")
    argv = _argv(teacher, tmp_path / "run", cache, "--data", f"file:{data}")
    main(argv)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")  # one test example fewer
    capsys.readouterr()
    err = _one_line_exit_2(capsys, argv + ["--resume"], "different run")
    assert "data:" in err


def test_a_run_under_another_tokenization_rule_is_another_run(teacher, cache, tmp_path, capsys, monkeypatch):
    """Runs trained before the tokenization rule changed (other token ids for the same texts) are
    not reused, by train nor by the study (which keys its runs by the same data fingerprint)."""
    from xlmr_mini import run_identity as identity

    data = _demo_file(cache, tmp_path / "d.jsonl")
    argv = _argv(teacher, tmp_path / "run", cache, "--data", f"file:{data}")
    main(argv)
    before = identity.data_fingerprint(f"file:{data}", cache)
    monkeypatch.setattr(identity, "ENCODING_VERSION", identity.ENCODING_VERSION + 1)
    assert identity.data_fingerprint(f"file:{data}", cache) != before
    capsys.readouterr()
    err = _one_line_exit_2(capsys, argv + ["--resume"], "different run")
    assert "data:" in err


def test_content_hashes_are_cached_by_size_and_mtime(tmp_path):
    f, cache_file = tmp_path / "x.bin", tmp_path / "fingerprints.json"
    f.write_bytes(b"a" * 100)
    first = file_sha256(f, cache_file)
    assert json.loads(cache_file.read_text())[str(f.resolve())][2] == first
    stat = f.stat()
    f.write_bytes(b"b" * 100)
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: the fast check trusts the cache
    assert file_sha256(f, cache_file) == first
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert file_sha256(f, cache_file) != first


# --- 3. an --out that contains an input ------------------------------------------------------
def test_an_out_holding_the_teacher_is_refused_before_anything_is_deleted(teacher, cache, tmp_path, capsys):
    out = tmp_path / "x"
    inside = Path(shutil.copytree(teacher, out / "best"))
    (out / "results.json").write_text("{}")
    _one_line_exit_2(capsys, _argv(inside, out, cache, "--overwrite"), "contains the input --teacher")
    assert (inside / "model.safetensors").is_file() and (out / "results.json").is_file()


def test_trim_refuses_an_out_holding_its_model(teacher, cache, tmp_path, capsys):
    from xlmr_mini.trim import main as trim_main

    with pytest.raises(SystemExit) as e:
        trim_main([str(teacher), "--data", "demo", "--out", str(teacher.parent), "--overwrite", "--cache-dir", str(cache)])
    assert e.value.code == 2 and "contains the input" in capsys.readouterr().err


# --- 4. a finished run is kept; --overwrite replaces it only when the new one is complete ----
def test_rerunning_a_finished_run_reports_it_and_keeps_it(teacher, cache, tmp_path, capsys):
    out = tmp_path / "run"
    first = main(_argv(teacher, out, cache))
    before = _state(out)
    capsys.readouterr()
    again = main(_argv(teacher, out, cache))
    printed = capsys.readouterr().out
    assert "holds this run, finished" in printed and "micro-F1" in printed
    assert again["final"] == first["final"] and _state(out) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_is_complete(teacher, cache, tmp_path, monkeypatch, capsys):
    import xlmr_mini.train as train_module

    out = tmp_path / "run"
    main(_argv(teacher, out, cache))
    (out / "notes.txt").write_text("mine")
    before = _state(out)
    real_step, calls = train_module.train_step, []

    def failing_step(*args):
        calls.append(1)
        if len(calls) == 2:  # the new run dies at its second step
            raise TrainingError("stopped by the test")
        return real_step(*args)

    monkeypatch.setattr(train_module, "train_step", failing_step)
    with pytest.raises(SystemExit):
        main(_argv(teacher, out, cache, "--overwrite", "--max-steps", "4"))
    assert _state(out) == before  # the old run, whole
    monkeypatch.setattr(train_module, "train_step", real_step)
    result = main(_argv(teacher, out, cache, "--overwrite", "--max-steps", "3"))
    saved = json.loads((out / "results.json").read_text())
    assert result["steps"] == saved["steps"] == 3 and (out / "best" / "model.safetensors").is_file()
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")) == [".run.lock"]


# --- 5. a run directory is locked while written ----------------------------------------------
def test_a_second_writer_of_a_run_is_refused(teacher, cache, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = parse_config(_argv(teacher, out, cache, "--precision", "fp32"))  # what auto resolves to here
    claim = claim_out(cfg, out, run_identity(cfg, teacher))  # another process writing this run
    try:
        err = _one_line_exit_2(capsys, _argv(teacher, out, cache, "--resume"), "another process")
        assert f"pid {os.getpid()}" in err
    finally:
        claim.release()
    assert main(_argv(teacher, out, cache, "--resume"))["steps"] == 2  # free again
