"""HF checkpoint directories in and out: round trips, layouts, and every bad input."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import hf_classifier, hf_config, padded_batch
from safetensors.torch import load_file, save_file

from xlmr_mini.checkpoint import hf_state_dict, load_model, read_hf_state_dict, save_model
from xlmr_mini.errors import InputError


def logits(model, ids, mask):
    with torch.no_grad():
        out = model(ids, mask) if not hasattr(model, "roberta") else model(input_ids=ids, attention_mask=mask)
    return out.logits


@pytest.fixture
def batch():
    return padded_batch(101, [10, 4, 7])


@pytest.fixture
def hf_dir(tmp_path):
    hf = hf_classifier()
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def test_transformers_save_then_our_load(hf_dir, batch):
    hf, path = hf_dir
    torch.testing.assert_close(logits(load_model(path).eval(), *batch), logits(hf, *batch), atol=1e-6, rtol=0)


def test_our_save_then_transformers_load(hf_dir, batch, tmp_path):
    from transformers import AutoModelForSequenceClassification

    _, path = hf_dir
    ours = load_model(path).eval()
    save_model(tmp_path / "ours", ours)
    back, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert type(back).__name__ == "XLMRobertaForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # The weights cross bit-exactly (same tensors on both sides); the forward passes are two
    # implementations, so they agree to fp32 tolerance, not bit for bit (kernel choice varies by CPU).
    theirs = {k.removeprefix("roberta."): v for k, v in back.state_dict().items()}
    ours_hf = hf_state_dict(ours)
    assert len(ours_hf) > 0
    for key, value in ours_hf.items():
        torch.testing.assert_close(theirs[key.removeprefix("roberta.")], value, atol=0, rtol=0)
    torch.testing.assert_close(logits(back.eval(), *batch), logits(ours, *batch), atol=1e-6, rtol=1e-5)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "xlm-roberta" and config["architectures"] == ["XLMRobertaForSequenceClassification"]
    assert config["id2label"] == {str(i): f"LABEL_{i}" for i in range(5)}


def test_saved_files_follow_the_umask_not_the_temporary_files_0600(hf_dir, tmp_path):
    """Writes go through a private temporary file; the model directory's files must still be
    readable by others (the user's umask), as any other file the user writes."""
    _, path = hf_dir
    old = os.umask(0o022)
    try:
        save_model(tmp_path / "ours", load_model(path))
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "ours").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_sharded_checkpoint(tmp_path, batch):
    hf = hf_classifier(hidden_size=64, intermediate_size=128)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(logits(load_model(tmp_path).eval(), *batch), logits(hf, *batch), atol=1e-6, rtol=0)


def test_keys_without_roberta_prefix_and_pytorch_bin(tmp_path, batch):
    hf = hf_classifier()
    state = {k.removeprefix("roberta."): v.contiguous() for k, v in hf.state_dict().items()}
    hf.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    torch.testing.assert_close(logits(load_model(tmp_path).eval(), *batch), logits(hf, *batch), atol=1e-6, rtol=0)


def test_masked_lm_checkpoint_drops_lm_head_and_inits_classifier(tmp_path, caplog):
    from transformers import XLMRobertaForMaskedLM

    torch.manual_seed(0)
    XLMRobertaForMaskedLM(hf_config()).save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="xlmr_mini"):
        cfg, state = read_hf_state_dict(tmp_path)
    assert not any(k.startswith("lm_head") for k in state)
    assert "lm_head" in caplog.text and "fresh" in caplog.text
    assert state["classifier.out_proj.weight"].shape == (cfg.num_labels, cfg.hidden_size)
    assert state["classifier.dense.bias"].abs().max() == 0
    assert 0.01 < state["classifier.dense.weight"].std() < 0.03  # initializer_range 0.02


def test_base_model_checkpoint_with_pooler(tmp_path):
    from transformers import XLMRobertaModel

    XLMRobertaModel(hf_config()).save_pretrained(tmp_path)
    cfg, state = read_hf_state_dict(tmp_path)
    assert "roberta.encoder.layer.0.attention.self.query.weight" in state
    assert not any("pooler" in k for k in state)


def test_bf16_round_trip_keeps_dtype(hf_dir, tmp_path, batch):
    _, path = hf_dir
    ours = load_model(path, dtype=torch.bfloat16).eval()
    save_model(tmp_path / "bf16", ours)
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "bf16" / "model.safetensors").values())
    torch.testing.assert_close(logits(load_model(tmp_path / "bf16").eval(), *batch), logits(ours, *batch), atol=0, rtol=0)


def test_save_copies_tokenizer(hf_dir, tmp_path):
    _, path = hf_dir
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"fake": true}')
    out = save_model(tmp_path / "with_tok", load_model(path), tokenizer_file=tok)
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


# Bad input: one line naming the file and the problem.
def _rewrite(path, fn):
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors")


@pytest.mark.parametrize(
    "corrupt, file, message",
    [
        (lambda p: (p / "config.json").unlink(), "config.json", "config.json not found"),
        (lambda p: (p / "config.json").write_text('{"model_type": "bert"}'), "config.json", "is not XLM-R"),
        (lambda p: (p / "config.json").write_text("{not json"), "config.json", "not valid JSON"),
        (lambda p: (p / "model.safetensors").unlink(), "hf", "no model.safetensors"),
        (lambda p: _rewrite(p, lambda s: s.pop("roberta.encoder.layer.1.output.dense.weight")), "hf",
         "'roberta.encoder.layer.1.output.dense.weight' is missing"),
        (lambda p: _rewrite(p, lambda s: s.update({"classifier.dense.weight": torch.zeros(3, 3)})), "model.safetensors",
         "has shape (3, 3), config.json implies (32, 32)"),
        (lambda p: _rewrite(p, lambda s: s.update({"roberta.encoder.extra.weight": torch.zeros(2)})), "model.safetensors",
         "unexpected tensor 'roberta.encoder.extra.weight'"),
        (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:1000]),
         "model.safetensors", "not a valid safetensors file"),
    ],
    ids=["no-config", "not-xlmr", "bad-json", "no-weights", "missing-tensor", "wrong-shape", "extra-key", "truncated"],
)
def test_bad_checkpoint_one_clear_line(hf_dir, corrupt, file, message):
    _, path = hf_dir
    corrupt(path)
    with pytest.raises(InputError) as e:
        load_model(path)
    text = str(e.value)
    assert "\n" not in text and file in text and message in text, text


def test_cli_bad_checkpoint_exits_2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    proc = subprocess.run([sys.executable, "-m", "xlmr_mini.check", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "config.json" in proc.stderr and "not XLM-R" in proc.stderr
