"""`python -m xlmr_mini.study`: every plan on the demo, run sharing, kill -9 and rerun, commands,
and the real tsm folder with an XLM-R-layout base."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARED, requires_shared, tiny_demo_model
from xlmr_mini.checkpoint import save_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import INITS, scratch_state_dict
from xlmr_mini.study import main
from xlmr_mini.study_plan import Planner, StudySettings, plan_runs
from xlmr_mini.train_config import parse_config

QUICK = ["--max-steps", "3", "--num-threads", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("study-cache")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _table_rows(md: str, metric_heading: str) -> list[list[str]]:
    """The rows of the Markdown table under `metric_heading`, cells stripped."""
    block = md.split(metric_heading, 1)[1].strip().split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


@pytest.fixture(scope="module")
def demo_study(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    written = main(["all", "--data", "demo", "--seeds", "1", "2", "--out", str(out), "--cache-dir", str(cache)] + QUICK)
    return out, written


def test_all_plans_write_tables_csv_and_figures(demo_study):
    out, written = demo_study
    for plan in ("table2", "table3", "table4", "table5", "figure2", "figure3"):
        assert (out / f"{plan}.md").is_file() and (out / f"{plan}.csv").is_file(), plan
    for fig in ("figure2.png", "figure3.png"):
        data = (out / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, fig
    assert {p.name for p in written} >= {"table2.md", "figure2.png", "figure3.png"}


def test_table2_layout_and_numbers_come_from_the_runs(demo_study):
    out, _ = demo_study
    md = (out / "table2.md").read_text()
    assert "| row | NON-KD (ours) | KD (ours) |" in md and "Scores are on the test split" in md
    for metric in ("micro-F1 (the paper's F1):", "macro-F1:"):
        rows = _table_rows(md, metric)
        labels = [r[0] for r in rows]
        assert labels == ["from-base (Teacher), 2L/128"] + [f"{i}, 1L/{w}" for w in (128, 64) for i in INITS]
        assert rows[0][2] == "—" and all("±" in cell for r in rows[1:] for cell in r[1:])
    records = _rows(out / "table2.csv")
    assert len(records) == 1 + 3 * 2 * 2 * 2  # the teacher, then init x KD x width x 2 seeds
    scratch_kd = [float(r["micro_f1"]) for r in records if r["row"] == "from-scratch, 1L/128" and r["column"] == "KD"]
    mean = 100 * sum(scratch_kd) / 2
    cell = _table_rows(md, "micro-F1 (the paper's F1):")[3][2]
    assert cell.startswith(f"{mean:.2f} ±")


def test_zero_shot_tables_score_unseen_languages(demo_study):
    out, _ = demo_study
    for plan, n in (("table3", 1 + 3 * 2 * 2 * 2), ("table4", 1 + 3 * 2)):
        records = _rows(out / f"{plan}.csv")
        assert len(records) == n and {r["scored_on"] for r in records} == {"unseen"}
    md = (out / "table3.md").read_text()
    assert [r[0] for r in _table_rows(md, "macro-F1:")][-3:] == [f"{i}, trained on english lang" for i in INITS]


def test_table5_has_the_majority_class_row(demo_study):
    out, _ = demo_study
    rows = _table_rows((out / "table5.md").read_text(), "micro-F1 (the paper's F1):")
    assert [r[0] for r in rows] == ["With Finetune", "Without Finetune", "Random Score (majority class)"]
    # the demo's test split is balanced over 8 labels: the majority class scores 1/8 at most + noise
    assert 5.0 < float(rows[2][1]) < 20.0


def test_a_second_study_trains_nothing(demo_study, cache, capsys):
    out, _ = demo_study
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/results.json")}
    main(["table5", "--data", "demo", "--seeds", "1", "2", "--out", str(out), "--cache-dir", str(cache)] + QUICK)
    printed = capsys.readouterr().out
    assert "0 to run" in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/results.json")} == before


def test_runs_are_shared_between_plans(demo_study):
    out, _ = demo_study
    t2 = {r["run"] for r in _rows(out / "table2.csv") if r["row"] == "from-teacher, 1L/128" and r["column"] == "KD"}
    t5 = {r["run"] for r in _rows(out / "table5.csv") if r["row"] == "With Finetune"}
    f2 = {r["run"] for r in _rows(out / "figure2.csv") if r["row"] == "from-teacher" and r["column"] == "1"}
    assert len(t2) == 2 and t2 == t5 == f2


def test_dry_run_and_emitted_commands(demo_study, cache, tmp_path, capsys):
    out, _ = demo_study
    main(["table4", "--data", "demo", "--seeds", "3", "--out", str(out), "--cache-dir", str(cache), "--dry-run"] + QUICK)
    printed = capsys.readouterr().out
    assert "estimated time" in printed and "table4" in printed
    assert len([line for line in printed.splitlines() if "student-" in line and "done" not in line]) == 3
    cmds = tmp_path / "cmds.txt"
    main(["table3", "--data", "demo", "--seeds", "1", "--out", str(tmp_path / "s"), "--cache-dir", str(cache),
          "--emit-commands", str(cmds)] + QUICK)
    lines = cmds.read_text().splitlines()
    stages = [i for i, line in enumerate(lines) if line.startswith("# stage")]
    assert len(stages) == 2
    teachers, students = lines[stages[0] + 1:stages[1]], lines[stages[1] + 1:]
    assert len(teachers) == 1 and "--teacher" not in teachers[0] and len(students) == 12
    teacher_dir = teachers[0].split("--out ")[1].split()[0]
    for line in students:
        argv = line.split(" -m xlmr_mini.train ")[1].split()
        cfg = parse_config(argv)
        assert cfg.teacher == f"{teacher_dir}/best" and cfg.resume and cfg.max_steps == 3


def test_bad_input_is_one_line_exit_2(cache, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["table2", "--data", "tsm:/nowhere", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--base" in err
    with pytest.raises(SystemExit) as e:
        main(["table9", "--data", "demo"])
    assert e.value.code == 2


def test_a_moved_study_finds_its_runs(demo_study, cache, tmp_path, capsys):
    out, _ = demo_study
    moved = Path(shutil.copytree(out, tmp_path / "moved"))
    main(["table5", "--data", "demo", "--seeds", "1", "2", "--out", str(moved), "--cache-dir", str(cache)] + QUICK)
    assert "0 to run" in capsys.readouterr().out
    assert _rows(moved / "table5.csv") == _rows(out / "table5.csv")


def test_run_keys_follow_content_not_paths(cache, tmp_path):
    base = tiny_demo_model(cache, tmp_path / "base")
    data = tmp_path / "tsm"
    (data / "english").mkdir(parents=True)
    (data / "english" / "train_text.txt").write_text("good\nbad\n")

    def keys(out: str) -> list[str]:
        s = StudySettings(data=f"tsm:{data}", base=str(base), seeds=(1,), out=tmp_path / out)
        return sorted(plan_runs(["table5"], Planner(s, 2, 32)))

    first = keys("a")
    assert keys("b") == first  # another study folder: the same runs
    (data / "english" / "train_text.txt").write_text("good\nbad\nugly\n")
    assert not set(keys("a")) & set(first)  # the data changed: every run is another


def test_a_study_out_reused_with_other_settings_is_refused(cache, tmp_path, capsys):
    common = ["table5", "--data", "demo", "--base", str(tiny_demo_model(cache, tmp_path / "base")), "--seeds", "1",
              "--out", str(tmp_path / "s"), "--cache-dir", str(cache), "--num-threads", "1"]
    main(common + ["--max-steps", "1"])
    table = (tmp_path / "s" / "table5.md").read_text()
    assert "--max-steps 1" in table
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(common + ["--max-steps", "2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "other settings" in err and "max-steps" in err
    assert (tmp_path / "s" / "table5.md").read_text() == table
    main(common + ["--max-steps", "2", "--overwrite"])
    assert "--max-steps 2" in (tmp_path / "s" / "table5.md").read_text()
    assert len({r["settings"] for r in _rows(tmp_path / "s" / "table5.csv")}) == 1


def _children(pid: int) -> list[int]:
    """The pool workers among `pid`'s child processes."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table in /proc (Linux)")
def test_kill_9_of_a_parallel_study_ends_its_workers(cache, tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "xlmr_mini.study", "table4", "--data", "demo", "--seeds", "1", "--jobs", "2",
           "--base", str(tiny_demo_model(cache, tmp_path / "base")), "--max-steps", "100000", "--num-threads", "1",
           "--out", str(out), "--cache-dir", str(cache)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(out.glob("runs/*/run.json")):  # a worker is training
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert workers
        os.kill(proc.pid, signal.SIGKILL)  # the study alone, not its process group
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(map(_alive, workers)):
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of it
        except ProcessLookupError:
            pass


def _study_cmd(out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "xlmr_mini.study", "table5", "--data", "demo", "--seeds", "1", "--epochs", "2",
            "--out", str(out), "--cache-dir", str(cache), "--num-threads", "1"]


def test_kill_9_then_rerun_gives_the_same_numbers(cache, tmp_path):
    main(["table5", "--data", "demo", "--seeds", "1", "--epochs", "2", "--out", str(tmp_path / "whole"),
          "--cache-dir", str(cache), "--num-threads", "1"])
    broken = tmp_path / "broken"
    proc = subprocess.Popen(_study_cmd(broken, cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(broken.glob("runs/student-*/checkpoint")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (broken / "table5.md").exists()
    done = subprocess.run(_study_cmd(broken, cache), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already done" in done.stdout
    whole, again = _rows(tmp_path / "whole" / "table5.csv"), _rows(broken / "table5.csv")
    assert [(r["row"], r["micro_f1"], r["macro_f1"]) for r in whole] == [(r["row"], r["micro_f1"], r["macro_f1"]) for r in again]


@requires_shared("data", "tweet_sentiment_multilingual")
@requires_shared("tokenizers", "xlm-roberta", "tokenizer.json")
def test_real_tsm_with_an_xlmr_layout_base(cache, tmp_path):
    base = tmp_path / "base"
    cfg = XLMRConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=130)
    save_hf(base, cfg, scratch_state_dict(cfg, 0), SHARED / "tokenizers" / "xlm-roberta" / "tokenizer.json")
    tsm = f"tsm:{SHARED / 'data' / 'tweet_sentiment_multilingual'}"
    common = ["--data", tsm, "--base", str(base), "--out", str(tmp_path / "s"), "--cache-dir", str(cache),
              "--max-length", "32", "--num-threads", "1", "--seeds", "1"]
    main(["table5", "--max-steps", "2"] + common)
    main(["table3", "--epochs", "1", "--batch-size", "32"] + common)
    t5 = (tmp_path / "s" / "table5.md").read_text()
    assert "dev split (the data has no test split" in t5 and "67.61" in t5 and "33.33" in t5
    records = _rows(tmp_path / "s" / "table3.csv")
    assert len(records) == 1 + 12 and all(0.0 <= float(r["micro_f1"]) <= 1.0 for r in records)
    assert {r["reported_split"] for r in records} == {"dev"}
    rows = _table_rows((tmp_path / "s" / "table3.md").read_text(), "micro-F1 (the paper's F1):")
    assert rows[1][3:] == ["53.99", "54.02"]  # the paper's from-teacher row beside ours
