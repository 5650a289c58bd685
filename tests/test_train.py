"""`python -m xlmr_mini.train`: end to end on the demo and on real tweets, resume, bad input, compile."""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TSM, XLMR_TOKENIZER, padded_batch, requires_shared
from xlmr_mini.checkpoint import load_model, save_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import scratch_state_dict
from xlmr_mini.data import build_demo
from xlmr_mini.errors import InputError
from xlmr_mini.kd_loss import HiddenProjection, KDLossConfig, kd_taps
from xlmr_mini.model import Attention, Dropout, XLMRClassifier, init_weights
from xlmr_mini.demo_models import demo_architecture
from xlmr_mini.kd_step import compile_forward_loss, forward_loss, train_step
from xlmr_mini.train import main, train
from xlmr_mini.train_config import DEMO_LR, TrainConfig


@pytest.fixture(scope="module")
def demo_teacher(cache, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide demo teacher fine-tuned from scratch (the teacher path of `train`)."""
    task = build_demo(cache)
    arch = demo_architecture(task).replace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128)
    out = tmp_path_factory.mktemp("teacher")
    cfg = TrainConfig(init="from-scratch", data="demo", no_kd=True, epochs=45, lr=1e-3, warmup_ratio=0.1, out=str(out),
                      cache_dir=str(cache), eval_steps=750)
    result = train(cfg, arch=arch, quiet=True)
    print(f"demo test teacher: dev micro-F1 {result['dev_score']:.3f}")
    assert result["dev_score"] > 0.5, result["dev_score"]
    return out / "best"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_demo_kd_run_writes_metrics_results_and_hf_model(demo_teacher, cache, tmp_path, capsys):
    out = tmp_path / "run"
    result = main(["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "12",
                   "--eval-steps", "5", "--out", str(out), "--cache-dir", str(cache), "--num-threads", "1"])
    printed = capsys.readouterr().out
    assert "micro-F1" in printed and "macro-F1" in printed and "epsilon *" in printed and f"wrote {out}" in printed
    records = _records(out)
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    assert train_steps == list(range(1, 13))
    assert all(set(r) >= {"loss", "att", "hid", "embd", "pred", "clf", "lr", "share"} for r in records if r["type"] == "train")
    for r in (r for r in records if r["type"] == "train"):  # each term's share of the total loss
        assert sum(r["share"].values()) == pytest.approx(1.0) and r["share"]["clf"] == pytest.approx(r["clf"] / r["loss"])
    assert [r["step"] for r in records if r["type"] == "eval" and not r.get("final")] == [5, 10, 12]
    saved = json.loads((out / "results.json").read_text())
    assert saved["reported_split"] == "test" and saved["config"]["layers"] == 1 and saved["steps"] == 12
    assert saved["metric"] == "micro-f1" and saved["config"]["att_target"] == "probs"
    assert saved["final"]["overall"]["macro_f1"] == result["final"]["overall"]["macro_f1"]
    assert set(saved["final"]["languages"]) == {"alpha", "beta", "gamma", "delta", "epsilon", "zeta"}
    _check_transformers_loads(out / "best")


def _check_transformers_loads(path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ours = load_model(path).eval()
    ids, mask = padded_batch(ours.cfg.vocab_size, [6, 3])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, ours(ids, mask).logits,
                                   atol=1e-5, rtol=1e-4)


def test_from_teacher_kd_beats_from_scratch_no_kd(demo_teacher, cache, tmp_path):
    """The pipeline transfers knowledge: same student size, data, steps and learning rate."""
    common = dict(data="demo", teacher=str(demo_teacher), layers=1, epochs=3, cache_dir=str(cache), num_threads=1)
    kd = train(TrainConfig(init="from-teacher", out=str(tmp_path / "kd"), **common), quiet=True)
    scratch = train(TrainConfig(init="from-scratch", no_kd=True, out=str(tmp_path / "scratch"), **common), quiet=True)
    assert kd["dev_score"] > scratch["dev_score"] + 0.15, (kd["dev_score"], scratch["dev_score"])


def test_resume_reaches_the_same_weights(demo_teacher, cache, tmp_path):
    common = ["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "9",
              "--eval-steps", "4", "--cache-dir", str(cache), "--num-threads", "1", "--hidden", "32",
              "--keep-checkpoint"]
    main(common + ["--out", str(tmp_path / "whole")])
    stopped = main(common + ["--out", str(tmp_path / "split"), "--stop-after", "6"])
    assert stopped == {"stopped_at": 6}
    with pytest.raises(SystemExit) as e:  # an unfinished run is not silently restarted
        main(common + ["--out", str(tmp_path / "split")])
    assert e.value.code == 2
    main(common + ["--out", str(tmp_path / "split"), "--resume"])
    whole = load_file(tmp_path / "whole" / "checkpoint" / "model.safetensors")
    split = load_file(tmp_path / "split" / "checkpoint" / "model.safetensors")
    assert whole.keys() == split.keys() and any(k.startswith("proj.") for k in whole)
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    steps = [r["step"] for r in _records(tmp_path / "split") if r["type"] == "train"]
    assert steps == list(range(1, 10))


@pytest.mark.parametrize("flags", [["--bf16"], ["--kd-impl", "fused", "--att-target", "probs"],
                                   ["--hid-proj", "select", "--hidden", "32"]])
def test_training_options_run(flags, demo_teacher, cache, tmp_path):
    out = tmp_path / "o"
    result = main(["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "2",
                   "--out", str(out), "--cache-dir", str(cache), "--num-threads", "1"] + flags)
    losses = [r["loss"] for r in _records(out) if r["type"] == "train"]
    assert len(losses) == 2 and all(map(math.isfinite, losses)) and result["steps"] == 2


def test_several_seeds_report_mean_and_spread(demo_teacher, cache, tmp_path, capsys):
    out = tmp_path / "seeds"
    summary = main(["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "2",
                    "--seed", "1", "2", "--out", str(out), "--cache-dir", str(cache), "--num-threads", "1"])
    printed = capsys.readouterr().out
    assert "mean of 2 seeds" in printed
    runs = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (1, 2)]
    f1 = [r["final"]["overall"]["macro_f1"] for r in runs]
    assert summary["seeds"] == [1, 2] and summary["final_macro_f1"]["mean"] == pytest.approx(sum(f1) / 2)
    assert json.loads((out / "results.json").read_text())["final_macro_f1"]["n"] == 2
    # The best seed on dev (the first of equals) is also the run's best/, where one seed's would be.
    best = max(runs, key=lambda r: r["dev_score"])["seed"]
    assert summary["best_seed"] == best and f"best on dev: seed {best}" in printed
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / "best" / name).read_bytes() == (out / f"seed-{best}" / "best" / name).read_bytes()
    assert not list(out.glob("**/checkpoint"))


def test_nan_loss_stops_and_keeps_last_checkpoint(demo_teacher, cache, tmp_path, monkeypatch, capsys):
    import xlmr_mini.kd_step as kd_step_module

    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        total, terms = forward_loss(*args, **kwargs)
        calls["n"] += 1
        return (total * float("nan") if calls["n"] == 5 else total), terms

    monkeypatch.setattr(kd_step_module, "forward_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        main(["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "8",
              "--eval-steps", "3", "--out", str(out), "--cache-dir", str(cache), "--num-threads", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "step 5" in err and "nan" in err and "checkpoint" in err
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["step"] == 3


def test_deterministic_flag_holds_during_the_run_only(demo_teacher, cache, tmp_path, monkeypatch):
    """--deterministic: PyTorch's deterministic algorithms and the cuBLAS workspace setting during
    every step, both as before afterwards; on CPU the numbers are those of a run without it."""
    import xlmr_mini.train as train_module

    seen = []

    def recording(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return train_step(*args, **kwargs)

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(train_module, "train_step", recording)
    common = ["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "3",
              "--cache-dir", str(cache), "--num-threads", "1"]
    main(common + ["--out", str(tmp_path / "plain")])
    main(common + ["--out", str(tmp_path / "det"), "--deterministic"])
    assert seen == [(False, None)] * 3 + [(True, ":4096:8")] * 3
    assert not torch.are_deterministic_algorithms_enabled()
    losses = [[r["loss"] for r in _records(tmp_path / run) if r["type"] == "train"] for run in ("plain", "det")]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("case", ["unknown-init", "no-teacher", "labels", "different-run"])
def test_bad_input_is_one_line_exit_2(case, demo_teacher, cache, tmp_path, capsys):
    base = ["--cache-dir", str(cache), "--num-threads", "1", "--out", str(tmp_path / "o"), "--max-steps", "1"]
    if case == "unknown-init":
        argv, expect = ["--init", "from-nowhere"], "invalid choice"
    elif case == "no-teacher":
        data = tmp_path / "d.jsonl"
        data.write_text('{"text": "a", "label": "x", "lang": "en", "split": "train"}\n'
                        '{"text": "b", "label": "y", "lang": "en", "split": "dev"}\n')
        argv, expect = ["--init", "from-teacher", "--data", f"file:{data}"], "--teacher"
    elif case == "labels":
        other = tmp_path / "t"
        cfg = XLMRConfig.from_hf(demo_teacher).replace(id2label=("a", "b", "c"))
        save_hf(other, cfg, scratch_state_dict(cfg, 0), demo_teacher / "tokenizer.json")
        argv, expect = ["--init", "from-teacher", "--teacher", str(other)], "not among the model's"
    else:
        main(["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1"] + base)
        capsys.readouterr()
        argv, expect = ["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "2"], "different run"
    with pytest.raises(SystemExit) as e:
        main(argv + base)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err


@requires_shared("data", "tweet_sentiment_multilingual")
@requires_shared("tokenizers", "xlm-roberta", "tokenizer.json")
def test_real_tweets_teacher_then_student(cache, tmp_path, capsys):
    """A tiny random 'base' over XLM-R's real vocabulary: fine-tune it as a teacher, distil a student."""
    base = tmp_path / "base"
    cfg = XLMRConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=130)
    save_hf(base, cfg, scratch_state_dict(cfg, 0), XLMR_TOKENIZER)
    data = ["--data", f"tsm:{TSM}", "--subset", "0.02", "--max-length", "32", "--cache-dir", str(cache),
            "--num-threads", "1", "--eval-batch-size", "256"]
    teacher = main(["--init", "from-base", "--base", str(base), "--no-kd", "--max-steps", "6", "--out",
                    str(tmp_path / "teacher")] + data)
    assert teacher["reported_split"] == "dev" and teacher["student"]["layers"] == 2
    student = main(["--init", "from-teacher", "--teacher", str(tmp_path / "teacher" / "best"), "--max-steps", "4",
                    "--out", str(tmp_path / "student")] + data)
    printed = capsys.readouterr().out
    assert "has no test split" in printed and "arabic *" in printed
    assert student["student"]["layers"] == 1 and set(student["final"]["languages"]) == {
        "arabic", "english", "french", "german", "hindi", "italian", "portuguese", "spanish"}
    assert len([r for r in _records(tmp_path / "student") if r["type"] == "train"]) == 4
    _check_transformers_loads(tmp_path / "student" / "best")


def _tiny_pair():
    def model(layers, hidden, seed):
        torch.manual_seed(seed)
        cfg = XLMRConfig(vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=2 * hidden, max_position_embeddings=40, id2label=("a", "b", "c"))
        m = XLMRClassifier(cfg)
        init_weights(m, 0.2)
        return m

    return model(4, 64, 0).eval(), model(2, 32, 1).train()


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_compiled_kd_step_matches_eager(recompute):
    """The KD training step's forward + loss compiles with fullgraph=True (reference path, CPU) and
    gives the eager loss and gradients; also with --recompute's checkpointed layers."""
    teacher, student = _tiny_pair()
    proj = HiddenProjection(32, 64)
    loss_cfg = KDLossConfig()
    ids, mask = padded_batch(60, [9, 4, 7])
    labels = torch.tensor([0, 2, 1])
    with torch.inference_mode():
        t_out = teacher(ids, mask, kd_taps(loss_cfg, [1, 3]))
    student.eval()  # no dropout: the two runs must see the same function
    if recompute:  # checkpointing acts in training mode only: train, with the dropouts at 0
        student.train().recompute = True
        for m in student.modules():
            if isinstance(m, Dropout):
                m.p = 0.0
            elif isinstance(m, Attention):
                m.dropout_p = 0.0
    results = []
    for fn in (forward_loss, compile_forward_loss("inductor")):
        student.zero_grad()
        proj.zero_grad()
        total, terms = fn(student, proj, ids, mask, labels, t_out, loss_cfg, [1, 3])
        total.backward()
        grads = [p.grad.clone() for p in list(student.parameters()) + list(proj.parameters())]
        results.append((total.detach(), grads))
    (t_e, g_e), (t_c, g_c) = results
    torch.testing.assert_close(t_c, t_e, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The evaluation protocol (selection languages, metric, reported split, depth, presets, defaults)
# ---------------------------------------------------------------------------------------------
SEEN_DEMO = {"alpha", "beta", "gamma", "delta"}


@pytest.mark.parametrize("select_on", ["train-langs", "all"])
def test_zero_shot_selects_on_training_languages_only(select_on, demo_teacher, cache, tmp_path, capsys):
    out = tmp_path / select_on
    result = main(["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "6",
                   "--eval-steps", "3", "--langs", "seen", "--select-on", select_on, "--out", str(out),
                   "--cache-dir", str(cache), "--num-threads", "1"])
    evals = [r for r in _records(out) if r["type"] == "eval" and not r.get("final")]
    chosen = SEEN_DEMO if select_on == "train-langs" else SEEN_DEMO | {"epsilon", "zeta"}
    assert [set(r["languages"]) for r in evals] == [chosen, chosen]
    assert result["select_on"] == select_on and set(result["selection_languages"]) == chosen
    # The reported split still covers every language, unseen ones included.
    assert set(result["final"]["languages"]) == SEEN_DEMO | {"epsilon", "zeta"} and "unseen" in result["final"]
    printed = capsys.readouterr().out
    assert "unseen (pooled)" in printed and "unseen (mean of 2 langs)" in printed and "micro-F1" in printed
    assert ("dev of 4 training languages" in printed) == (select_on == "train-langs")


def test_selection_metric_is_recorded_and_used(demo_teacher, cache, tmp_path):
    runs = {}
    for metric in ("micro-f1", "macro-f1"):
        out = tmp_path / metric
        runs[metric] = main(["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1",
                             "--max-steps", "4", "--eval-steps", "2", "--metric", metric, "--out", str(out),
                             "--cache-dir", str(cache), "--num-threads", "1"])
        evals = [r for r in _records(out) if r["type"] == "eval" and not r.get("final")]
        key = metric.replace("-", "_")
        assert runs[metric]["metric"] == metric and all(r["metric"] == metric for r in evals)
        assert runs[metric]["dev_score"] == max(r["overall"][key] for r in evals)


def test_student_depth_defaults_to_half_the_teacher_whenever_one_is_known(demo_teacher, cache, tmp_path):
    """from-base --no-kd with a teacher used to train a base-deep student silently."""
    result = main(["--init", "from-base", "--base", str(demo_teacher), "--teacher", str(demo_teacher), "--no-kd",
                   "--max-steps", "1", "--out", str(tmp_path / "o"), "--cache-dir", str(cache), "--num-threads", "1"])
    assert XLMRConfig.from_hf(demo_teacher).num_hidden_layers == 2 and result["student"]["layers"] == 1


def test_no_test_split_says_dev_is_reported(demo_teacher, cache, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"text": f"word{i} text {i % 3}", "label": "xy"[i % 2], "lang": ["en", "fr"][i % 2 // 1],
             "split": "train" if i < 16 else "dev"} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = main(["--init", "from-scratch", "--base", str(demo_teacher), "--no-kd", "--data", f"file:{data}",
                   "--max-steps", "2", "--out", str(tmp_path / "o"), "--cache-dir", str(cache), "--num-threads", "1"])
    printed = capsys.readouterr().out
    assert result["reported_split"] == "dev"
    assert "no test split" in printed and "selected the checkpoint" in printed
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["reported_split"] == "dev" and "no test split" in saved["note"]


def test_paper_preset_fills_what_is_not_given():
    from xlmr_mini.train_config import parse_config

    cfg = parse_config(["--preset", "paper", "--data", "tsm:x", "--langs", "seen"])
    assert (cfg.batch_size, cfg.epochs, cfg.seeds, cfg.eval_steps) == (8, 30, (1, 2, 3), 250)
    # The paper trained in fp32 on plain random batches, evaluating only every --eval-steps.
    assert (cfg.precision, cfg.group_by_length, cfg.eval_last_step) == ("fp32", False, False)
    assert cfg.logging_steps == 500  # transformers' logging_steps: not a ~1 GB metrics.jsonl on massive
    assert parse_config(["--preset", "paper", "--data", "massive:x", "--langs", "english"]).eval_steps == 100
    assert parse_config(["--preset", "paper", "--data", "tsm:x"]).eval_steps == 500
    assert parse_config(["--preset", "paper", "--data", "massive:x", "--langs", "seen"]).eval_steps == 5000
    assert parse_config(["--preset", "paper", "--data", "tsm:x", "--langs", "english"]).eval_steps == 60
    # Keyed on the paper's section: Table 3's English-trained students are §3.3 (250 / 5000, not 60 / 100).
    for data, steps in (("tsm:x", 250), ("massive:x", 5000)):
        assert parse_config(["--preset", "paper-3.3", "--data", data, "--langs", "english"]).eval_steps == steps
    assert parse_config(["--preset", "paper-3.4", "--data", "tsm:x", "--langs", "english"]).eval_steps == 60
    explicit = parse_config(["--preset", "paper", "--data", "tsm:x", "--batch-size", "32", "--seed", "7",
                             "--precision", "auto", "--group-by-length"])
    assert explicit.batch_size == 32 and explicit.seeds == (7,) and explicit.epochs == 30
    assert explicit.precision == "auto" and explicit.group_by_length is True
    # Not a preset: our defaults; and the preset is no part of a run's identity.
    plain = parse_config(["--data", "tsm:x"])
    assert (plain.batch_size, plain.seeds, plain.eval_steps, plain.epochs) == (32, (42,), None, None)
    assert (plain.precision, plain.group_by_length, plain.eval_last_step, plain.logging_steps) == ("auto", True, True, 1)
    same = parse_config(["--data", "tsm:x", "--batch-size", "8", "--epochs", "30", "--seed", "1", "2", "3",
                         "--eval-steps", "500", "--precision", "fp32", "--no-group-by-length", "--no-eval-last-step"])
    assert parse_config(["--preset", "paper", "--data", "tsm:x"]).identity() == same.identity()


def _eval_steps(out: Path) -> list[int]:
    return [r["step"] for r in _records(out) if r["type"] == "eval" and not r.get("final")]


def test_no_eval_last_step_evaluates_only_on_the_grid(demo_teacher, cache, tmp_path):
    """As the paper's Trainer: no evaluation at a last step off the --eval-steps grid, unless the
    run had none at all (there must be a best model)."""
    common = ["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--eval-steps", "2",
              "--cache-dir", str(cache), "--num-threads", "1", "--no-eval-last-step"]
    result = main(common + ["--max-steps", "5", "--out", str(tmp_path / "grid")])
    assert _eval_steps(tmp_path / "grid") == [2, 4] and result["best_step"] in (2, 4) and result["steps"] == 5
    main(common + ["--max-steps", "1", "--out", str(tmp_path / "short")])
    assert _eval_steps(tmp_path / "short") == [1]


def test_resolved_precision_is_part_of_the_run(demo_teacher, cache, tmp_path, monkeypatch, capsys):
    """--precision auto is stored as what it resolved to: the same command on hardware where auto
    means bf16 is another run, not a resume of the fp32 one."""
    out = tmp_path / "o"
    argv = ["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "2",
            "--cache-dir", str(cache), "--num-threads", "1", "--out", str(out)]
    result = main(argv + ["--stop-after", "1"])
    identity = json.loads((out / "run.json").read_text())["identity"]
    assert identity["precision"] == "fp32" and "stopped_at" in result  # the demo's 64-wide models: fp32
    monkeypatch.setattr("xlmr_mini.run_setup.resolve_precision", lambda *a, **k: "bf16")  # a bf16 GPU
    with pytest.raises(SystemExit) as e:
        main(argv + ["--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "precision: 'fp32' there, 'bf16' now" in err, err


def test_dropout_overrides_reach_the_saved_model(demo_teacher, cache, tmp_path):
    main(["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "1",
          "--dropout", "0", "--attention-dropout", "0.05", "--cache-dir", str(cache), "--num-threads", "1",
          "--out", str(tmp_path / "o")])
    saved = XLMRConfig.from_hf(tmp_path / "o" / "best")
    assert XLMRConfig.from_hf(demo_teacher).hidden_dropout_prob == 0.1
    assert (saved.hidden_dropout_prob, saved.attention_probs_dropout_prob, saved.classifier_dropout) == (0.0, 0.05, None)
    with pytest.raises(InputError, match="--dropout 1.5"):
        TrainConfig(dropout=1.5)


def test_from_scratch_kd_learns_with_the_default_attention_target(demo_teacher, cache, tmp_path):
    """With probabilities as the attention target (the default) the KD terms do not swamp L_clf:
    a from-scratch student beats the majority class clearly. (5 epochs: after 3 the dev score was
    0.21-0.29 over seeds, with torch's dropout masks and the hashed ones alike; after 5, 0.25-0.70.)"""
    assert TrainConfig().att_target == "probs"
    result = train(TrainConfig(init="from-scratch", data="demo", teacher=str(demo_teacher), layers=1, epochs=5,
                               out=str(tmp_path / "o"), cache_dir=str(cache), num_threads=1), quiet=True)
    task = build_demo(cache)
    dev = task.splits["dev"].labels
    majority = np.bincount(dev).max() / len(dev)
    assert result["dev_score"] > majority + 0.15, (result["dev_score"], majority)
    shares = [r["share"] for r in _records(tmp_path / "o") if r["type"] == "train"]
    assert np.mean([s["clf"] for s in shares[-20:]]) > 0.05  # the label loss is not drowned out


def test_trainer_defaults_are_transformers_defaults(tmp_path):
    """AdamW hyper-parameters, no warm-up, linear decay to 0 and clipping at 1.0, as transformers'
    TrainingArguments and get_linear_schedule_with_warmup, step by step."""
    import dataclasses

    from transformers import TrainingArguments, get_linear_schedule_with_warmup

    from xlmr_mini.kd_step import linear_schedule, make_optimizer
    from xlmr_mini.train_config import PAPER_LR

    hf = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    ours = TrainConfig(data="tsm:x")
    assert ours.weight_decay == hf["weight_decay"] and ours.max_grad_norm == hf["max_grad_norm"]
    assert ours.warmup_ratio == 0.0 and hf["warmup_steps"] == 0 and not hf.get("warmup_ratio")
    assert hf["lr_scheduler_type"] == "linear"
    assert PAPER_LR == hf["learning_rate"]
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], PAPER_LR, ours.weight_decay)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        hf["learning_rate"], (hf["adam_beta1"], hf["adam_beta2"]), hf["adam_epsilon"], hf["weight_decay"])
    for warmup in (0, 3):
        mine = make_optimizer([torch.nn.Parameter(torch.zeros(2))], 5e-5, 0.0)
        theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=5e-5)
        a, b = linear_schedule(mine, 10, warmup), get_linear_schedule_with_warmup(theirs, warmup, 10)
        for _ in range(12):
            assert mine.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], abs=1e-15)
            mine.step(), theirs.step(), a.step(), b.step()


# ---------------------------------------------------------------------------------------------
# Vocabulary trimming and precision
# ---------------------------------------------------------------------------------------------
def _word_rows(path: Path) -> torch.Tensor:
    return load_file(path / "model.safetensors")["roberta.embeddings.word_embeddings.weight"]


@pytest.mark.parametrize("weight_decay", [0.0, 1.0])
def test_trimmed_vocabulary_run_equals_the_full_one(weight_decay, demo_teacher, cache, tmp_path):
    """Training on the task's rows is the same run as on the whole table: same loss curve, same
    scores, same saved model; rows never trained stay where they started (times the weight
    decay's product when there is one)."""
    common = ["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "10",
              "--eval-steps", "5", "--cache-dir", str(cache), "--num-threads", "1", "--precision", "fp32",
              "--weight-decay", str(weight_decay)]
    trimmed = main(common + ["--out", str(tmp_path / "trimmed")])
    full = main(common + ["--out", str(tmp_path / "full"), "--no-trim"])
    vocab = XLMRConfig.from_hf(demo_teacher).vocab_size
    assert full["trained_vocab"] is None and trimmed["trained_vocab"] < vocab
    assert trimmed["student"]["vocab"] == full["student"]["vocab"] == vocab
    losses = [[r["loss"] for r in _records(tmp_path / name) if r["type"] == "train"] for name in ("trimmed", "full")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5, atol=1e-7)
    for key in ("micro_f1", "macro_f1"):
        assert trimmed["final"]["overall"][key] == pytest.approx(full["final"]["overall"][key], abs=1e-9)
    a, b = (load_file(tmp_path / name / "best" / "model.safetensors") for name in ("trimmed", "full"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    start, rows = _word_rows(demo_teacher), _word_rows(tmp_path / "trimmed" / "best")
    unchanged = (rows == start).all(dim=1)
    if weight_decay == 0.0:
        assert int(unchanged.sum()) >= vocab - trimmed["trained_vocab"]  # bit-equal, not merely close
    else:  # AdamW shrank every untouched row by the product of (1 - lr_t * wd) up to the best step
        logged = [r["lr"] for r in _records(tmp_path / "trimmed") if r["type"] == "train"]
        used = [DEMO_LR] + logged[:-1]  # the lr a step used is the one logged after the step before
        scale = math.prod(1.0 - lr * weight_decay for lr in used[: trimmed["best_step"]])
        shrunk = torch.isclose(rows, start * scale, rtol=1e-6, atol=0).all(dim=1) & (rows != start).any(dim=1)
        assert scale < 0.999 and int(shrunk.sum()) >= vocab - trimmed["trained_vocab"]


def test_recompute_run_is_the_same_run(demo_teacher, cache, tmp_path):
    """--recompute: the same losses and the same saved model as without it, bit for bit (dropout
    on), and the run's identity is unchanged, so a run started without it resumes with it."""
    common = ["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "2", "--max-steps", "4",
              "--eval-steps", "2", "--cache-dir", str(cache), "--num-threads", "1", "--precision", "fp32"]
    main(common + ["--out", str(tmp_path / "plain")])
    main(common + ["--out", str(tmp_path / "recompute"), "--recompute"])
    losses = [[r["loss"] for r in _records(tmp_path / name) if r["type"] == "train"] for name in ("plain", "recompute")]
    assert len(losses[0]) == 4 and losses[1] == losses[0]
    a, b = (load_file(tmp_path / name / "best" / "model.safetensors") for name in ("plain", "recompute"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert main(common + ["--out", str(tmp_path / "split"), "--stop-after", "2"]) == {"stopped_at": 2}
    main(common + ["--out", str(tmp_path / "split"), "--resume", "--recompute"])
    assert [r["loss"] for r in _records(tmp_path / "split") if r["type"] == "train"] == losses[0]


def _step_context(loss_norm: str, impl: str = "reference"):
    """A 2-layer teacher and a 1-layer, narrower student without dropout (so that a batch run in
    parts draws nothing differently), with projection, AdamW and the schedule."""
    from xlmr_mini.checkpoint import build_model
    from xlmr_mini.copy_weights import StudentSpec, layer_map, student_config
    from xlmr_mini.kd_step import StepContext, linear_schedule, make_optimizer

    tcfg = XLMRConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                      max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      id2label=("a", "b", "c"))
    teacher = build_model(tcfg, scratch_state_dict(tcfg, 0)).eval().requires_grad_(False)
    scfg = student_config(tcfg, StudentSpec(layers=1, hidden=16))
    student = build_model(scfg, scratch_state_dict(scfg, 1)).train()
    torch.manual_seed(2)
    proj = HiddenProjection(16, 32)
    params = list(student.parameters()) + list(proj.parameters())
    optimizer = make_optimizer(params, 1e-3, 0.01)
    return StepContext(student=student, teacher=teacher, proj=proj, loss_cfg=KDLossConfig(loss_norm=loss_norm, impl=impl),
                       layer_map=layer_map(2, 1), optimizer=optimizer, scheduler=linear_schedule(optimizer, 10),
                       params=params)


@pytest.mark.parametrize("loss_norm, impl", [("masked", "reference"), ("tinybert", "reference"), ("masked", "fused")])
def test_grad_accum_equals_the_large_batch(loss_norm, impl):
    """--grad-accum: the batch in 3 passes gives the one-pass step's loss, terms and weights, up to
    float rounding, over several steps (clipping and AdamW included); the fused kernels (interpreted
    on CPU) divide by the whole batch's counts as the reference does."""
    from xlmr_mini.kd_step import train_step

    whole, parts = _step_context(loss_norm, impl), _step_context(loss_norm, impl)
    for step in range(3):
        ids, mask = padded_batch(50, [9, 3, 7, 1 + step, 5, 8, 2], seed=step)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1, 0, 2, 1])}
        a, b = train_step(whole, batch, "cpu"), train_step(parts, batch, "cpu", accum=3)
        for key in ("loss", "att", "hid", "embd", "pred", "clf"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    for (name, x), y in zip(whole.student.state_dict().items(), parts.student.state_dict().values()):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(parts.proj.fit_dense.weight, whole.proj.fit_dense.weight, atol=1e-6, rtol=1e-5)
    assert not torch.equal(whole.proj.fit_dense.weight, _step_context(loss_norm).proj.fit_dense.weight)  # it trained


def test_logging_steps_write_means_and_resume(demo_teacher, cache, tmp_path):
    """--logging-steps 3: one record per 3 steps (and the last), the mean of those steps' per-step
    records; a run stopped inside a window resumes it."""
    common = ["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "7",
              "--eval-steps", "4", "--cache-dir", str(cache), "--num-threads", "1"]
    main(common + ["--out", str(tmp_path / "every")])
    main(common + ["--out", str(tmp_path / "three"), "--logging-steps", "3", "--stop-after", "4"])
    main(common + ["--out", str(tmp_path / "three"), "--logging-steps", "3", "--resume"])
    every = [r for r in _records(tmp_path / "every") if r["type"] == "train"]
    three = [r for r in _records(tmp_path / "three") if r["type"] == "train"]
    assert [r["step"] for r in three] == [3, 6, 7] and [r["logged_steps"] for r in three] == [3, 3, 1]
    for record, window in zip(three, (every[0:3], every[3:6], every[6:7])):
        for key in ("loss", "att", "clf"):
            assert record[key] == pytest.approx(np.mean([r[key] for r in window]), rel=1e-9), key
        assert record["share"]["clf"] == pytest.approx(np.mean([r["share"]["clf"] for r in window]), rel=1e-9)
        assert record["lr"] == window[-1]["lr"]
    evals = lambda out: [r["step"] for r in _records(out) if r["type"] == "eval"]  # noqa: E731
    assert evals(tmp_path / "three") == evals(tmp_path / "every")


def test_checkpoints_follow_save_steps_and_a_finished_run_removes_its_own(demo_teacher, cache, tmp_path, monkeypatch,
                                                                          capsys):
    """--save-steps apart from --eval-steps; the checkpoint goes when the run is done, unless
    --keep-checkpoint; the dev scores of each evaluation are printed."""
    import xlmr_mini.train as train_module

    saved = []
    real_save = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint",
                        lambda path, ctx, progress, rng=None: (saved.append(progress["step"]),
                                                               real_save(path, ctx, progress, rng)))
    common = ["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "7",
              "--eval-steps", "5", "--cache-dir", str(cache), "--num-threads", "1"]
    main(common + ["--out", str(tmp_path / "a"), "--save-steps", "2"])
    assert saved == [2, 4, 6]  # none at the end: the finished run removes it anyway
    assert (tmp_path / "a" / "results.json").is_file() and (tmp_path / "a" / "best" / "model.safetensors").is_file()
    assert not [p.name for p in (tmp_path / "a").iterdir() if "checkpoint" in p.name]
    err = capsys.readouterr().err
    assert "seed 42: step 5/7: dev micro-F1" in err and "seed 42: step 7/7: dev micro-F1" in err, err
    saved.clear()
    main(common + ["--out", str(tmp_path / "b"), "--keep-checkpoint"])
    assert saved == [5, 7]
    assert json.loads((tmp_path / "b" / "checkpoint" / "progress.json").read_text())["step"] == 7


def test_report_to_tensorboard_writes_events(demo_teacher, cache, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["--init", "from-teacher", "--teacher", str(demo_teacher), "--layers", "1", "--max-steps", "4",
              "--eval-steps", "2", "--cache-dir", str(cache), "--num-threads", "1", "--report-to", "tensorboard"]
    main(common + ["--out", str(tmp_path / "o")])
    events = EventAccumulator(str(tmp_path / "o" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("dev/micro_f1")] == [2, 4]
    first = [r for r in _records(tmp_path / "o") if r["type"] == "train"][0]
    assert events.Scalars("train/loss")[0].value == pytest.approx(first["loss"], rel=1e-6)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as without the extra
    with pytest.raises(SystemExit) as e:
        main(common + ["--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--report-to tensorboard: the tensorboard package is not installed" in err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("flags, message", [
    (["--grad-accum", "40", "--batch-size", "32"], "--grad-accum 40: more passes than the 32 examples"),
    (["--grad-accum", "0"], "--grad-accum 0: must be at least 1"),
    (["--logging-steps", "0"], "--logging-steps 0: must be at least 1"),
])
def test_impossible_trainer_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o")] + flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
