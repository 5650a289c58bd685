"""Micro-F1 (the paper's F1) / macro-F1 per language, and `python -m xlmr_mini.evaluate` on saved and copied models."""
import json

import numpy as np
import pytest

from xlmr_mini.checkpoint import save_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import scratch_state_dict
from xlmr_mini.evaluate import main as evaluate_main
from xlmr_mini.inference import label_ids
from xlmr_mini.errors import InputError
from xlmr_mini.metrics import format_table, macro_f1, mean_over_seeds, micro_f1, score_by_language, summarize_seeds


def test_macro_f1_by_hand():
    gold = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    # class 0: tp 1, 2 gold, 2 pred -> 0.5; class 1: tp 2, 2 gold, 3 pred -> 0.8; class 2: 0
    assert macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert micro_f1(gold, pred) == pytest.approx(3 / 5)
    # a class absent from both gold and predictions does not count (scikit-learn's convention)
    assert macro_f1(np.array([3, 3]), np.array([3, 3])) == 1.0
    assert macro_f1(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == 0.0


def test_scores_per_language_and_partitions():
    gold = np.array([0, 1, 0, 1, 1])
    pred = np.array([0, 1, 1, 1, 0])
    langs = ["en", "en", "fr", "fr", "hi"]
    s = score_by_language(gold, pred, langs, unseen=frozenset({"fr", "hi"}))
    assert list(s["languages"]) == ["en", "fr", "hi"]
    assert s["languages"]["en"] == {"micro_f1": 1.0, "macro_f1": 1.0, "n": 2}
    assert s["seen"]["n"] == 2 and s["unseen"]["n"] == 3
    # unseen pooled: 1 of 3 right; mean of languages: fr 1/2, hi 0/1 -> 0.25
    assert s["unseen"]["micro_f1"] == pytest.approx(1 / 3)
    assert s["unseen_mean"]["micro_f1"] == pytest.approx(0.25) and s["unseen_mean"]["languages"] == 2
    assert s["seen_mean"]["micro_f1"] == 1.0
    assert s["overall"]["macro_f1"] == pytest.approx(macro_f1(gold, pred))
    table = format_table(s, frozenset({"fr", "hi"}), "dev")
    assert "micro-F1" in table and "macro-F1" in table and "fr *" in table and "unseen (pooled)" in table
    assert "unseen (mean of 2 langs)" in table and "paper's F1" in table
    assert len([line for line in table.splitlines() if line.startswith(("en", "fr", "hi"))]) == 3


def test_majority_class_is_the_papers_random_score():
    """Table 5's random score (all predictions the majority class) is micro-F1: 33.33% on 3 balanced
    classes, where macro-F1 would be 16.7%."""
    gold = np.repeat([0, 1, 2], 10)
    pred = np.zeros_like(gold)
    assert micro_f1(gold, pred) == pytest.approx(1 / 3)
    assert macro_f1(gold, pred) == pytest.approx((2 * 10 / 40) / 3)


def test_mean_over_seeds_averages_every_row():
    a = score_by_language(np.array([0, 1]), np.array([0, 1]), ["en", "fr"], frozenset({"fr"}))
    b = score_by_language(np.array([0, 1]), np.array([1, 1]), ["en", "fr"], frozenset({"fr"}))
    m = mean_over_seeds([a, b])
    assert m["languages"]["en"]["micro_f1"] == 0.5 and m["languages"]["en"]["n"] == 1
    assert m["overall"]["micro_f1"] == pytest.approx(0.75) and set(m) == set(a)


def test_seed_summary():
    s = summarize_seeds([0.5, 0.7, 0.6])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1) and s["n"] == 3


def test_label_ids_maps_names_and_rejects_unknown():
    assert label_ids(("b", "a"), ("a", "b", "c"), "m").tolist() == [1, 0]
    with pytest.raises(InputError, match="'z'"):
        label_ids(("a", "z"), ("a", "b"), "teacher")


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """A random 2-layer classifier over the demo's vocabulary and labels, saved as an HF dir."""
    from xlmr_mini.data import build_demo
    from xlmr_mini.tokenizer import Tokenizer

    cache = tmp_path_factory.mktemp("cache")
    task = build_demo(cache)
    cfg = XLMRConfig(vocab_size=Tokenizer(task.tokenizer_path).vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=130, id2label=task.labels)
    path = tmp_path_factory.mktemp("model")
    save_hf(path, cfg, scratch_state_dict(cfg, seed=0), task.tokenizer_path)
    return path, cache, task


def test_evaluate_cli_saved_model(demo_model, tmp_path, capsys):
    path, cache, task = demo_model
    scores = evaluate_main(["--model", str(path), "--data", "demo", "--cache-dir", str(cache),
                            "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert "micro-F1" in out and "macro-F1" in out and "test split" in out
    assert set(scores["languages"]) == set(task.languages)
    assert scores["overall"]["n"] == len(task.splits["test"])
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["overall"] == scores["overall"] and saved["precision"] == "fp32"  # auto: a tiny model stays fp32
    evaluate_main(["--model", str(path), "--data", "demo", "--cache-dir", str(cache), "--precision", "bf16",
                   "--json", str(tmp_path / "b.json")])
    bf16 = json.loads((tmp_path / "b.json").read_text())
    assert bf16["precision"] == "bf16" and abs(bf16["overall"]["micro_f1"] - scores["overall"]["micro_f1"]) < 0.05


def test_evaluate_cli_copied_student_without_training(demo_model, capsys):
    path, cache, _ = demo_model
    scores = evaluate_main(["--init", "from-teacher", "--teacher", str(path), "--layers", "1", "--data", "demo",
                            "--split", "dev", "--langs", "seen", "--cache-dir", str(cache)])
    out = capsys.readouterr().out
    assert "from-teacher student (1 layers, untrained)" in out
    assert "epsilon" not in scores["languages"] and "alpha" in scores["languages"]


def test_evaluate_cli_bad_input_is_one_line_exit_2(demo_model, tmp_path, capsys):
    path, cache, task = demo_model
    other = tmp_path / "other"
    cfg = XLMRConfig.from_hf(path).replace(id2label=("x", "y"))
    save_hf(other, cfg, scratch_state_dict(cfg, seed=0), task.tokenizer_path)
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--model", str(other), "--data", "demo", "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "not among the model's" in err
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--data", "demo", "--cache-dir", str(cache)])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err
