"""`python -m xlmr_mini.study`: every plan on the demo, run sharing, kill -9 and rerun, commands,
and the real tsm folder with an XLM-R-layout base."""
import csv
import json
import os
import re
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
from xlmr_mini.data import build_demo
from xlmr_mini.run_identity import model_fingerprint
from xlmr_mini.study import main
from xlmr_mini.study_plan import Planner, StudySettings, plan_runs
from xlmr_mini.tokenizer import Tokenizer
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
    written = main(["all", "--data", "demo", "--seed", "1", "2", "--out", str(out), "--cache-dir", str(cache)] + QUICK)
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
        assert labels == [f"from-base (Teacher, seed {_selected_seed(out, 'all')}), 2L/128"] + [
            f"{i}, 1L/{w}" for w in (128, 64) for i in INITS]
        assert rows[0][2] == "—" and all("±" in cell for r in rows[1:] for cell in r[1:])
    records = _rows(out / "table2.csv")
    assert len(records) == 1 + 3 * 2 * 2 * 2  # the selected teacher, then init x KD x width x 2 seeds
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
    assert "±" in rows[0][1] and "seed" not in rows[1][1]  # the copied student's evaluation is deterministic
    majority = [r for r in _rows(out / "table5.csv") if r["row"] == "Random Score (majority class)"]
    assert len(majority) == 1 and f"{100 * float(majority[0]['micro_f1']):.2f}" == rows[2][1]
    assert majority[0]["reported_split"] == "test" and majority[0]["seed"] == majority[0]["run"] == ""


def _selected_seed(out: Path, langs: str) -> int:
    """The seed of the teacher selected for `langs`, from the teacher runs' own results.json."""
    scores = {}
    for path in sorted((out / "runs").glob(f"teacher-{langs}-seed*/results.json")):
        r = json.loads(path.read_text())
        scores[r["seed"]] = r["dev_score"]
    return max(sorted(scores), key=lambda seed: scores[seed])


def test_teachers_train_with_every_seed_and_the_best_teaches(demo_study, cache):
    out, _ = demo_study
    for langs in ("all", "seen", "english"):
        assert len(list((out / "runs").glob(f"teacher-{langs}-seed*/results.json"))) == 2, langs
        seed = _selected_seed(out, langs)
        [selection] = (out / "runs").glob(f"teacher-{langs}-selected-*")
        assert (selection / "best").resolve() == next((out / "runs").glob(f"teacher-{langs}-seed{seed}-*")).resolve() / "best"
        students = [json.loads(p.read_text())["identity"]["teacher"] for p in (out / "runs").glob("student-*/run.json")]
        assert model_fingerprint(selection / "best", cache) in students  # the selected teacher, by content
    md = (out / "table3.md").read_text()
    note = next(line for line in md.splitlines() if line.startswith("Teachers, one per seed"))
    seed = _selected_seed(out, "seen")
    assert note.count("seed ") == 2 and f"seed {seed}: dev" in note and note.count("(selected)") == 1
    assert f"seed {seed}: dev" in note.split("(selected)")[0].rsplit(";", 1)[-1]
    assert "## Data used" in md and "- trained on `seen`: 4 languages (alpha, beta, delta, gamma); train" in md
    assert "- scored on `unseen`: 2 languages (epsilon, zeta); test " in md


def test_a_second_study_trains_nothing(demo_study, cache, capsys):
    out, _ = demo_study
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/results.json")}
    main(["table5", "--data", "demo", "--seed", "1", "2", "--out", str(out), "--cache-dir", str(cache)] + QUICK)
    printed = capsys.readouterr().out
    assert "0 to run" in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/results.json")} == before


def test_each_teacher_cache_is_built_once_as_its_own_stage(demo_study, cache):
    out, _ = demo_study
    stages = [json.loads(p.read_text()) for p in (out / "runs").glob("teacher-cache-*/cache.json")]
    # table2/5 and figure2/3 (all languages: one per subset), table3 (seen, english), table4 (english)
    assert len(stages) == 5 + 2 + 1
    assert sorted(Path(s["cache"]) for s in stages) == sorted(p for p in (cache / "teacher").iterdir())


def test_runs_are_shared_between_plans(demo_study):
    out, _ = demo_study
    t2 = {r["run"] for r in _rows(out / "table2.csv") if r["row"] == "from-teacher, 1L/128" and r["column"] == "KD"}
    t5 = {r["run"] for r in _rows(out / "table5.csv") if r["row"] == "With Finetune"}
    f2 = {r["run"] for r in _rows(out / "figure2.csv") if r["row"] == "from-teacher" and r["column"] == "1"}
    assert len(t2) == 2 and t2 == t5 == f2


def test_dry_run_and_emitted_commands(demo_study, cache, tmp_path, capsys):
    out, _ = demo_study
    main(["table4", "--data", "demo", "--seed", "3", "--out", str(out), "--cache-dir", str(cache), "--dry-run"] + QUICK)
    printed = capsys.readouterr().out
    assert "estimated time" in printed and "table4" in printed
    assert "teacher caches: 1, " in printed and "MB of disk in" in printed
    assert len([line for line in printed.splitlines() if "student-" in line and "done" not in line]) == 3
    cmds = tmp_path / "cmds.txt"
    main(["table3", "--data", "demo", "--seed", "1", "--out", str(tmp_path / "s"), "--cache-dir", str(cache),
          "--emit-commands", str(cmds)] + QUICK)
    lines = cmds.read_text().splitlines()
    stages = [i for i, line in enumerate(lines) if line.startswith("# stage")]
    assert len(stages) == 4  # the teacher; its selection; its caches and the NON-KD students; the KD students
    teachers, selection = lines[stages[0] + 1:stages[1]], lines[stages[1] + 1:stages[2]]
    third, fourth = lines[stages[2] + 1:stages[3]], lines[stages[3] + 1:]
    caches = [line for line in third if " -m xlmr_mini.cache_teacher " in line]
    assert len(caches) == 2  # one per training split (seen, english), shared by every init and seed
    assert all("--no-kd" not in line and " -m xlmr_mini.train " in line for line in fourth)
    students = [line for line in third if line not in caches] + fourth
    assert len(teachers) == 1 and "--teacher" not in teachers[0] and len(students) == 12
    teacher_dir = teachers[0].split("--out ")[1].split()[0]
    assert len(selection) == 1 and f" -m xlmr_mini.select_teacher {teacher_dir} --out " in selection[0]
    selected_dir = selection[0].split("--out ")[1].split()[0]
    for line in students:
        argv = line.split(" -m xlmr_mini.train ")[1].split()
        cfg = parse_config(argv)
        assert cfg.teacher == f"{selected_dir}/best" and cfg.resume and cfg.max_steps == 3


def test_teacher_cache_off_runs_every_kd_student_with_its_live_teacher(cache, tmp_path):
    """`study --teacher-cache off`: no cache stages; each KD student gets --teacher-cache off; the
    runs keep the keys they have with the cache (reading it is the same run)."""
    def emitted(*flags):
        cmds = tmp_path / f"cmds{len(flags)}.txt"
        main(["table3", "--data", "demo", "--seed", "1", "--out", str(tmp_path / "s"), "--cache-dir", str(cache),
              "--emit-commands", str(cmds), *flags] + QUICK)
        return [line for line in cmds.read_text().splitlines() if not line.startswith("#")]

    with_cache, live = emitted(), emitted("--teacher-cache", "off")
    assert not [line for line in live if " -m xlmr_mini.cache_teacher " in line]
    students = [line for line in live if " -m xlmr_mini.train " in line and "--teacher " in line]
    kd = [line for line in students if "--no-kd" not in line]
    assert len(kd) == 6 and all("--teacher-cache off" in line for line in kd)
    outs = lambda lines: sorted(line.split("--out ")[1].split()[0] for line in lines if " -m xlmr_mini.train " in line)  # noqa: E731
    assert outs(live) == outs(with_cache)


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
    main(["table5", "--data", "demo", "--seed", "1", "2", "--out", str(moved), "--cache-dir", str(cache)] + QUICK)
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
    common = ["table5", "--data", "demo", "--base", str(tiny_demo_model(cache, tmp_path / "base")), "--seed", "1",
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
    cmd = [sys.executable, "-m", "xlmr_mini.study", "table4", "--data", "demo", "--seed", "1", "--jobs", "2",
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
    return [sys.executable, "-m", "xlmr_mini.study", "table5", "--data", "demo", "--seed", "1", "--epochs", "2",
            "--out", str(out), "--cache-dir", str(cache), "--num-threads", "1"]


def test_kill_9_then_rerun_gives_the_same_numbers(cache, tmp_path, capfd):
    main(["table5", "--data", "demo", "--seed", "1", "--epochs", "2", "--out", str(tmp_path / "whole"),
          "--cache-dir", str(cache), "--num-threads", "1"])
    err = capfd.readouterr().err  # progress lines name their run, not "seed N"
    assert re.search(r"^student-from-teacher-kd-\S+-seed1-\w+ \[#", err, re.M) and not re.search(r"^seed \d", err, re.M)
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
              "--max-length", "32", "--num-threads", "1", "--seed", "1"]
    main(["table5", "--max-steps", "2"] + common)
    main(["table3", "--max-steps", "4", "--batch-size", "32"] + common)
    t5 = (tmp_path / "s" / "table5.md").read_text()
    assert "dev split (the data has no test split" in t5 and "67.61" in t5 and "33.33" in t5
    records = _rows(tmp_path / "s" / "table3.csv")
    assert len(records) == 1 + 12 and all(0.0 <= float(r["micro_f1"]) <= 1.0 for r in records)
    assert {r["reported_split"] for r in records} == {"dev"}
    rows = _table_rows((tmp_path / "s" / "table3.md").read_text(), "micro-F1 (the paper's F1):")
    assert rows[1][3:] == ["53.99", "54.02"]  # the paper's from-teacher row beside ours


def _small_tsm(root: Path) -> Path:
    """tsm's layout with 3 of its 8 languages and no test split (as a partial download would be)."""
    words = ["good", "bad", "fine", "great", "awful", "okay"]
    for lang in ("english", "german", "arabic"):
        for split, n in (("train", 24), ("val", 6)):
            (root / lang).mkdir(parents=True, exist_ok=True)
            (root / lang / f"{split}_text.txt").write_text("".join(f"{words[i % 6]} {lang} {i}\n" for i in range(n)))
            (root / lang / f"{split}_labels.txt").write_text("".join(f"{i % 3}\n" for i in range(n)))
    return root


def test_dry_run_lists_three_teachers_each_students_paper_flags_and_the_data_warning(cache, tmp_path, capsys):
    task = build_demo(cache)
    base = tmp_path / "base"
    cfg = XLMRConfig(vocab_size=Tokenizer(task.tokenizer_path).vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=130)
    save_hf(base, cfg, scratch_state_dict(cfg, 0), task.tokenizer_path)
    main(["table3", "--data", f"tsm:{_small_tsm(tmp_path / 'tsm')}", "--base", str(base), "--out", str(tmp_path / "s"),
          "--cache-dir", str(cache), "--num-threads", "1", "--max-length", "32", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert "holds 3 of the paper's 8 tsm languages (missing seen: italian, spanish; missing unseen: french, hindi, " \
           "portuguese)" in warning and "no test split" in warning
    runs = {line.split()[0]: lines[i + 1].split() for i, line in enumerate(lines) if line.startswith(("teacher-", "student-"))}
    assert sorted(name.rsplit("-", 1)[0] for name in runs if name.startswith("teacher-seen-seed")) == [
        "teacher-seen-seed1", "teacher-seen-seed2", "teacher-seen-seed3"]
    [selected] = [name for name in runs if name.startswith("teacher-seen-selected")]
    students = {name: parse_config(argv) for name, argv in runs.items() if name.startswith("student-")}
    assert len(students) == 3 * 2 * 2 * 3  # init x KD x training languages x seeds
    for name, cfg in students.items():  # §3.3's settings, the English-trained students' too; fp32, random batches
        assert (cfg.precision, cfg.group_by_length, cfg.eval_last_step, cfg.logging_steps) == ("fp32", False, False, 500), name
        assert (cfg.eval_steps, cfg.batch_size, cfg.epochs) == (250, 8, 30), name
        assert cfg.teacher == str(tmp_path / "s" / "runs" / selected / "best"), name
    assert {cfg.train_langs for cfg in students.values()} == {"seen", "english"}


def test_figure3_plots_window_means_read_once(tmp_path):
    from xlmr_mini.study_plan import Planner, StudySettings
    from xlmr_mini.study_report import Results, figure_title

    planner = Planner(StudySettings(data=f"tsm:{tmp_path}", base="b", seeds=(1,), out=tmp_path), 2, 32)
    run = planner.add("figure3", "student", "evaluate", {"x": 1})
    path = planner.path(run) / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    records = [{"type": "train", "step": k, "loss": float(k)} for k in range(1, 1201)]
    records.insert(500, {"type": "eval", "split": "dev", "step": 500, "overall": {"micro_f1": 0.5}})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    res = Results(planner.runs, planner)
    assert res.loss_windows(run, 500).tolist() == [250.5, 750.5, 1100.5]  # steps 1-500, 501-1000, 1001-1200
    path.unlink()
    assert res.loss_windows(run, 500).tolist() == [250.5, 750.5, 1100.5]  # not read again
    assert "not in the paper" in figure_title("figure3", "tsm") and "not in the paper" in figure_title("figure2", "tsm")
    assert figure_title("figure2", "massive") == "Figure 2"


@requires_shared("data", "tweet_sentiment_multilingual")
@requires_shared("tokenizers", "xlm-roberta", "tokenizer.json")
def test_dry_run_times_the_trimmed_vocabulary_training_uses(cache, tmp_path, monkeypatch):
    """--dry-run's step rates come from models with the rows training keeps (tsm: ~35k of XLM-R's
    250,002), not the whole table."""
    from xlmr_mini import study_estimate
    from xlmr_mini.data import encode_split, load_task
    from xlmr_mini.study import _parser, settings_from
    from xlmr_mini.tokenizer import Tokenizer
    from xlmr_mini.vocab import always_kept

    base = tmp_path / "base"
    cfg = XLMRConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=130)
    tokenizer = SHARED / "tokenizers" / "xlm-roberta" / "tokenizer.json"
    save_hf(base, cfg, scratch_state_dict(cfg, 0), tokenizer)
    tsm = f"tsm:{SHARED / 'data' / 'tweet_sentiment_multilingual'}"
    s, base_cfg = settings_from(_parser().parse_args(["table2", "--data", tsm, "--base", str(base), "--cache-dir",
                                                      str(cache), "--max-length", "32", "--num-threads", "1"]))
    sizes = []
    monkeypatch.setattr(study_estimate, "_seconds", lambda ctx, batch, device: sizes.append(
        (ctx.student.cfg.vocab_size, int(batch["input_ids"].max()))) or 1.0)
    task = load_task(tsm, cache_dir=str(cache))
    study_estimate.measure_step_seconds(s, base_cfg, task)
    tok = Tokenizer(tokenizer)
    used = set()
    for split in task.splits.values():
        used.update(encode_split(split, tok, 32, cache_dir=str(cache)).tokens.tolist())
    kept = used | set(always_kept(json.loads(tokenizer.read_text(encoding="utf-8"))))
    assert len(sizes) == 5 and {v for v, _ in sizes} == {len(kept)}
    assert all(top < vocab < 60_000 for vocab, top in sizes)


def test_precision_and_kd_options_pass_through_to_every_run(cache, tmp_path):
    cmds = tmp_path / "cmds.txt"
    main(["table4", "--data", "demo", "--seed", "1", "--out", str(tmp_path / "s"), "--cache-dir", str(cache),
          "--precision", "bf16", "--att-target", "scores", "--kd-impl", "fused", "--compile", "--emit-commands",
          str(cmds)] + QUICK)
    trains = [line.split(" -m xlmr_mini.train ")[1].split() for line in cmds.read_text().splitlines()
              if " -m xlmr_mini.train " in line]
    assert len(trains) == 1 + 3  # the teacher, three KD students
    for argv in trains:
        cfg = parse_config(argv)
        assert (cfg.precision, cfg.att_target, cfg.kd_impl, cfg.compile) == ("bf16", "scores", "fused", "on"), argv
    default = tmp_path / "default.txt"
    main(["table4", "--data", "demo", "--seed", "1", "--out", str(tmp_path / "d"), "--cache-dir", str(cache),
          "--emit-commands", str(default)] + QUICK)
    assert all(parse_config(line.split(" -m xlmr_mini.train ")[1].split()).precision == "fp32"
               for line in default.read_text().splitlines() if " -m xlmr_mini.train " in line)
