"""Bad input on every entry point: one line naming the file or flag, exit code 2, nothing written.

Each test below is one fault a user can make (a model with another model's tokenizer, NaN
weights, a malformed config.json, a damaged checkpoint, an unwritable or full output, ...).
"""
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from xlmr_mini import files
from xlmr_mini.check import main as check_main
from xlmr_mini.checkpoint import save_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import scratch_state_dict
from xlmr_mini.data import build_demo, load_task
from xlmr_mini.errors import InputError
from xlmr_mini.evaluate import main as evaluate_main
from xlmr_mini.kd_step import TrainingError
from xlmr_mini.run_dir import MetricsLog
from xlmr_mini.study import main as study_main
from xlmr_mini.tokenizer import Tokenizer
from xlmr_mini.train import main as train_main
from xlmr_mini.trim import main as trim_main

UNWRITABLE = Path("/sys/xlmr-mini-out")  # sysfs refuses new files, to root as well


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    build_demo(cache)
    return cache


@pytest.fixture(scope="module")
def model(cache, tmp_path_factory) -> Path:
    """A random 2-layer classifier over the demo's vocabulary and labels, with its tokenizer."""
    task = build_demo(cache)
    cfg = XLMRConfig(vocab_size=Tokenizer(task.tokenizer_path).vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=130, id2label=task.labels)
    path = tmp_path_factory.mktemp("model")
    save_hf(path, cfg, scratch_state_dict(cfg, seed=0), task.tokenizer_path)
    return path


def _variant(model: Path, dest: Path, config_changes: dict | None = None, tensors=None) -> Path:
    """A copy of `model` with config.json keys replaced (None values deleted) or other tensors."""
    shutil.copytree(model, dest)
    if config_changes is not None:
        config = json.loads((model / "config.json").read_text())
        config.update(config_changes)
        (dest / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(dest / "model.safetensors"))
    return dest


def _one_line(capsys, call, argv, code=2) -> str:
    """Run a CLI main; it must exit with `code` and print exactly one line on stderr."""
    with pytest.raises(SystemExit) as e:
        call(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == code and len(err.splitlines()) == 1, (e.value.code, err)
    return err


def _train_argv(model: Path, cache: Path, out: Path, *extra) -> list[str]:
    return ["--init", "from-teacher", "--teacher", str(model), "--layers", "1", "--max-steps", "2",
            "--cache-dir", str(cache), "--num-threads", "1", "--out", str(out), *extra]


# 1: the tokenizer must have one piece per word-embedding row
@pytest.mark.parametrize("rows", [+7, -7])
def test_a_model_with_another_tokenizer_is_refused(rows, model, cache, tmp_path, capsys):
    cfg = XLMRConfig.from_hf(model)
    cfg = cfg.replace(vocab_size=cfg.vocab_size + rows)
    other = tmp_path / "other"
    save_hf(other, cfg, scratch_state_dict(cfg, seed=0), model / "tokenizer.json")
    expect = f"{cfg.vocab_size} word-embedding rows"
    assert expect in _one_line(capsys, evaluate_main, ["--model", str(other), "--cache-dir", str(cache)])
    assert expect in _one_line(capsys, check_main, [str(other), "--text", "hello"])
    assert expect in _one_line(capsys, train_main, _train_argv(other, cache, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# 6: NaN or infinite weights name their tensor
def test_non_finite_weights_name_the_tensor(model, cache, tmp_path, capsys):
    tensors = load_file(str(model / "model.safetensors"))
    tensors["roberta.encoder.layer.1.output.dense.weight"][3, 4] = float("nan")
    bad = _variant(model, tmp_path / "nan", tensors=tensors)
    for call, argv in ((evaluate_main, ["--model", str(bad), "--cache-dir", str(cache)]), (check_main, [str(bad)]),
                       (train_main, _train_argv(bad, cache, tmp_path / "out"))):
        err = _one_line(capsys, call, argv)
        assert "'roberta.encoder.layer.1.output.dense.weight' holds 1 NaN or infinite" in err, err


# 7, 9, 12: flags out of range are refused before anything is written
@pytest.mark.parametrize("flags, expect", [
    (["--seed", "1", "1"], "seed 1 is given twice"),
    (["--warmup-ratio", "5"], "--warmup-ratio 5.0: must be a fraction in [0, 1)"),
    (["--lr", "nan"], "--lr nan: must be a positive number"),
    (["--lr", "-1"], "--lr -1.0: must be a positive number"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be a number >= 0"),
    (["--max-grad-norm", "inf"], "--max-grad-norm inf: must be a number >= 0"),
    (["--num-threads", "-2"], "--num-threads -2: must be at least 1"),
    (["--heads", "0"], "--heads 0: must be at least 1"),
    (["--max-length", "0"], "--max-length 0: must be at least 3"),
    (["--max-length", "2"], "--max-length 2: must be at least 3"),
    (["--max-length", "600"], "--max-length 600: the model has positions for at most 128 tokens"),
    (["--device", "foo"], "--device foo: not supported"),
    (["--device", "mps"], "--device mps: not supported"),
])
def test_train_flags_out_of_range(flags, expect, model, cache, tmp_path, capsys):
    out = tmp_path / "out"
    assert expect in _one_line(capsys, train_main, _train_argv(model, cache, out, *flags))
    assert not out.exists()  # no run.json: the corrected command is not "a different run"


@pytest.mark.parametrize("flags, expect", [
    (["--max-length", "600"], "--max-length 600: the model has positions for at most 128 tokens"),
    (["--max-length", "2"], "--max-length 2: must be at least 3"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--device", "mps"], "--device mps: not supported"),
])
def test_evaluate_flags_out_of_range(flags, expect, model, cache, tmp_path, capsys):
    argv = ["--model", str(model), "--cache-dir", str(cache), "--json", str(tmp_path / "s.json"), *flags]
    assert expect in _one_line(capsys, evaluate_main, argv)
    assert not (tmp_path / "s.json").exists()


def test_study_refuses_repeated_seeds_and_bad_overrides(model, cache, tmp_path, capsys):
    common = ["table5", "--base", str(model), "--out", str(tmp_path / "s"), "--cache-dir", str(cache)]
    assert "seed 2 is given twice" in _one_line(capsys, study_main, common + ["--seed", "1", "2", "2"])
    assert "--lr nan: must be a positive number" in _one_line(capsys, study_main, common + ["--lr", "nan"])
    assert not (tmp_path / "s").exists()


# 10: config.json checked where it is read, through every entry point
@pytest.mark.parametrize("changes, expect", [
    ({"hidden_size": "32"}, 'hidden_size is "32"; expected a positive integer'),
    ({"hidden_size": 32.0}, "hidden_size is 32.0; expected a positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0; expected a positive integer"),
    ({"num_hidden_layers": "2"}, 'num_hidden_layers is "2"; expected a positive integer'),
    ({"num_hidden_layers": -1}, "num_hidden_layers is -1; expected a positive integer"),
    ({"vocab_size": "250002"}, 'vocab_size is "250002"; expected a positive integer'),
    ({"layer_norm_eps": "1e-12"}, 'layer_norm_eps is "1e-12"; expected a positive number'),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob is 1.5; expected a number in [0, 1)"),
    ({"pad_token_id": True}, "pad_token_id is true; expected a non-negative integer"),
    ({"id2label": {"0": "a", "2": "c"}}, "id2label has no label for id 1"),
    ({"id2label": ["a", "b"]}, "id2label must be an object of label names by id"),
])
def test_malformed_config_is_one_line(changes, expect, model, tmp_path, capsys):
    bad = _variant(model, tmp_path / "bad", changes)
    err = _one_line(capsys, check_main, [str(bad)])
    assert str(bad / "config.json") in err and expect in err, err


@pytest.mark.parametrize("content, expect", [("[1, 2]", "got list"), ("null", "got null")])
def test_config_that_is_not_an_object(content, expect, model, cache, tmp_path, capsys):
    bad = _variant(model, tmp_path / "bad")
    (bad / "config.json").write_text(content)
    for call, argv in ((check_main, [str(bad)]), (evaluate_main, ["--model", str(bad), "--cache-dir", str(cache)]),
                       (train_main, _train_argv(bad, cache, tmp_path / "out")),
                       (study_main, ["table5", "--base", str(bad), "--out", str(tmp_path / "s"), "--cache-dir",
                                     str(cache), "--emit-commands", str(tmp_path / "c.sh")]),
                       (trim_main, [str(bad), "--data", "demo", "--out", str(tmp_path / "t")])):
        err = _one_line(capsys, call, argv)
        assert f"{bad / 'config.json'}: expected a JSON object of model settings, {expect}" in err, err
    assert not any((tmp_path / name).exists() for name in ("out", "s", "c.sh", "t"))


# 11: a damaged checkpoint or run.json on --resume
@pytest.fixture(scope="module")
def stopped_run(model, cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stopped") / "run"
    train_main(_train_argv(model, cache, out, "--max-steps", "4", "--stop-after", "2"))
    assert (out / "checkpoint" / "progress.json").is_file()
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, name", [
    (lambda out: _truncate(out / "checkpoint" / "model.safetensors"), "checkpoint/model.safetensors"),
    (lambda out: _truncate(out / "checkpoint" / "training_state.pt"), "checkpoint/training_state.pt"),
    (lambda out: (out / "checkpoint" / "progress.json").write_text("{\"step\": "), "checkpoint/progress.json"),
    (lambda out: (out / "run.json").write_text("{\"identity\": {"), "run.json"),
])
def test_damaged_files_on_resume_name_the_file(damage, name, stopped_run, model, cache, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    damage(out)
    err = _one_line(capsys, train_main, _train_argv(model, cache, out, "--max-steps", "4", "--resume"))
    assert f"{out / name}: damaged, cannot be read" in err and "--overwrite" in err, err


# 13: outputs that cannot be written are refused before any work
def test_outputs_of_the_wrong_kind_or_unwritable(model, cache, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    monkeypatch.setattr("xlmr_mini.trim.load_task", lambda *a, **k: pytest.fail("trim worked before checking --out"))
    cases = [
        (train_main, _train_argv(model, cache, a_file), f"--out {a_file}: exists and is not a directory"),
        (train_main, _train_argv(model, cache, UNWRITABLE), f"--out {UNWRITABLE}: cannot write in /sys"),
        (train_main, _train_argv(model, a_file, tmp_path / "o"), f"--cache-dir {a_file}: exists and is not a"),
        (evaluate_main, ["--model", str(model), "--json", str(a_dir)], f"--json {a_dir}: is a directory"),
        (evaluate_main, ["--model", str(model), "--json", str(a_file / "s.json")], f"{a_file} is not a directory"),
        (evaluate_main, ["--model", str(model), "--json", str(UNWRITABLE / "s.json")], "cannot write in /sys"),
        (trim_main, [str(model), "--data", "demo", "--out", str(UNWRITABLE)], "cannot write in /sys"),
        (study_main, ["table5", "--base", str(model), "--out", str(tmp_path / "s"), "--emit-commands", str(a_dir)],
         f"--emit-commands {a_dir}: is a directory"),
    ]
    for call, argv, expect in cases:
        assert expect in _one_line(capsys, call, argv)
    assert a_file.read_text() == "keep me\n" and not any(a_dir.iterdir()) and not (tmp_path / "o").exists()


def test_a_full_disk_says_so_and_where(tmp_path, monkeypatch):
    log = MetricsLog(Path("/dev/full"))  # every write to /dev/full fails with ENOSPC
    with pytest.raises(InputError, match="/dev/full: no space left on device"):
        log.write({"step": 1})

    def torch_style_failure(tmp):  # torch.save on a full disk: "unexpected pos ... vs ..."
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 6400 vs 6292")

    monkeypatch.setattr(files, "free_bytes", lambda path: 0)
    target = tmp_path / "state.pt"
    with pytest.raises(InputError, match=f"{target}: no space left on device"):
        files.atomic_write(target, torch_style_failure)
    assert list(tmp_path.iterdir()) == []


# 14: a diverged run inside the study; a parquet text column that is not text
def test_a_run_diverging_inside_the_study_is_one_line(model, cache, tmp_path, capsys, monkeypatch):
    def diverge(cfg, quiet=False, label=None):
        raise TrainingError("seed 1, step 3: the loss is nan; no checkpoint was written yet. Try a lower --lr.")

    monkeypatch.setattr("xlmr_mini.study.train", diverge)
    err = _one_line(capsys, study_main, ["table5", "--base", str(model), "--out", str(tmp_path / "s"), "--cache-dir",
                                         str(cache), "--jobs", "1", "--max-steps", "1"], code=1)
    assert "training stopped: run " in err and "step 3: the loss is nan" in err, err


def test_parquet_text_column_of_numbers(tmp_path, capsys, model, cache):
    folder = tmp_path / "tsm" / "english"
    for split in ("train", "validation"):
        (folder / split).mkdir(parents=True)
        pq.write_table(pa.table({"text": [1, 2, 3], "label": [0, 1, 2]}), folder / split / "0000.parquet")
    with pytest.raises(InputError, match="column 'text' has type int64; expected strings"):
        load_task(f"tsm:{tmp_path / 'tsm'}")
    data = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [[1], [2]], "label": ["a", "b"], "lang": ["en", "en"]}), data)
    err = _one_line(capsys, evaluate_main, ["--model", str(model), "--data", f"file:{data}", "--cache-dir", str(cache)])
    assert "column 'text' has type list<" in err and "expected strings" in err


# 15: --teacher given a file; check's usage errors
def test_model_paths_that_are_files(model, cache, tmp_path, capsys):
    weights = model / "model.safetensors"
    err = _one_line(capsys, train_main, _train_argv(weights, cache, tmp_path / "out"))
    assert f"--teacher {weights}: not a directory" in err
    assert f"--model {weights}: not a directory" in _one_line(capsys, evaluate_main, ["--model", str(weights)])
    assert "no such directory" in _one_line(capsys, check_main, [str(tmp_path / "nowhere")])
    assert not (tmp_path / "out").exists()


def test_check_usage_errors_are_one_line(capsys):
    assert "required: model" in _one_line(capsys, check_main, [])
    assert "unrecognized arguments: --nope" in _one_line(capsys, check_main, ["x", "--nope"])


def test_valid_configs_still_load(model):
    """The checks accept what transformers writes: int-keyed id2label, a null classifier_dropout."""
    d = json.loads((model / "config.json").read_text())
    d["id2label"] = {int(k): v for k, v in d["id2label"].items()}
    d["classifier_dropout"] = None
    cfg = XLMRConfig.from_hf_dict(d)
    assert cfg.id2label == XLMRConfig.from_hf(model).id2label and cfg.max_tokens == 128
    assert torch.isfinite(torch.tensor(cfg.layer_norm_eps))
