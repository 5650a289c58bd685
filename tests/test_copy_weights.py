"""Student initialization by weight copy: layer maps, evenly spaced width selection, the three
inits, and the command line, on tiny random XLM-R checkpoints built with transformers."""
import json
import subprocess
import sys

import pytest
import torch

from xlmr_mini.checkpoint import build_model, canonical_key, expected_shapes, read_hf_state_dict
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import (
    StudentSpec,
    attention_indices,
    copy_weights,
    head_indices,
    hidden_indices,
    init_student,
    layer_map,
    main,
    scratch_state_dict,
    select_evenly,
    student_config,
)
from xlmr_mini.errors import InputError
from xlmr_mini.model import Output, Taps

LABELS = ("neg", "neu", "pos")
ATOL = 1e-5


def hf_config(**overrides):
    from transformers import XLMRobertaConfig

    kw = dict(vocab_size=97, hidden_size=32, num_hidden_layers=12, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5,
              id2label=dict(enumerate(LABELS)), label2id={x: i for i, x in enumerate(LABELS)})
    kw.update(overrides)
    return XLMRobertaConfig(**kw)


def random_teacher(seed=0, **overrides):
    """(cfg, canonical HF state dict) of a random transformers classifier, LayerNorms perturbed
    so that copying a wrong LayerNorm element would show."""
    from transformers import XLMRobertaForSequenceClassification

    torch.manual_seed(seed)
    hf = XLMRobertaForSequenceClassification(hf_config(**overrides))
    sd = {canonical_key(k): v for k, v in hf.state_dict().items()}
    for k, v in sd.items():
        if "LayerNorm" in k or k.endswith("bias"):
            v.add_(torch.randn_like(v) * 0.1)
    return XLMRConfig.from_hf_dict(hf.config.to_dict()), sd


def batch(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, 0], ids[row, n - 1] = 0, 2
    ids[mask == 0] = 1
    return ids, mask


@pytest.fixture(scope="module")
def teacher():
    return random_teacher()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, teacher):
    from transformers import XLMRobertaForSequenceClassification

    cfg, sd = teacher
    d = tmp_path_factory.mktemp("teacher")
    hf = XLMRobertaForSequenceClassification(hf_config())
    hf.load_state_dict(sd, strict=True)
    hf.save_pretrained(d)
    (d / "tokenizer.json").write_text('{"version": "1.0", "note": "stand-in"}\n', encoding="utf-8")
    return d


# --- selection rules ------------------------------------------------------------------------

def test_select_evenly_dividing_and_linspace():
    assert select_evenly(4, 2).tolist() == [0, 2]  # the paper's 4x4 -> 2x2: 1st and 3rd (1-based)
    assert select_evenly(768, 384).tolist() == list(range(0, 768, 2))
    assert select_evenly(3072, 1536).dtype == torch.int64
    assert select_evenly(12, 3).tolist() == [0, 4, 8]
    assert select_evenly(7, 7).tolist() == list(range(7))
    assert select_evenly(10, 4).tolist() == [0, 3, 6, 9]  # round(linspace(0, 9, 4)) = 0, 3, 6, 9
    assert select_evenly(64, 40).tolist() == torch.linspace(0, 63, 40).round().long().tolist()
    assert select_evenly(9, 1).tolist() == [0]
    with pytest.raises(InputError, match="cannot select 5 evenly spaced elements out of 4"):
        select_evenly(4, 5)
    assert torch.equal(hidden_indices(768, 384), select_evenly(768, 384))


def test_attention_indices_keep_each_student_head_inside_one_teacher_head():
    t = XLMRConfig(hidden_size=64, num_attention_heads=4)
    s = t.replace(hidden_size=40)  # head 16 -> 10: does not divide, linspace inside each head
    idx = attention_indices(t, s)
    within = torch.linspace(0, 15, 10).round().long()
    assert idx.tolist() == torch.cat([h * 16 + within for h in range(4)]).tolist()
    assert (idx.view(4, 10) // 16 == torch.arange(4)[:, None]).all()
    # sizes that divide: identical to the residual stream's evenly spaced selection
    assert torch.equal(attention_indices(XLMRConfig(), XLMRConfig(hidden_size=384)), select_evenly(768, 384))
    # fewer heads: whole teacher heads 0, 2, ..., 10
    fewer = attention_indices(XLMRConfig(), XLMRConfig(hidden_size=384, num_attention_heads=6))
    assert head_indices(12, 6).tolist() == [0, 2, 4, 6, 8, 10]
    assert fewer.tolist() == [h * 64 + j for h in range(0, 12, 2) for j in range(64)]


def test_layer_map_divisor_and_explicit():
    assert layer_map(12, 6) == [1, 3, 5, 7, 9, 11]  # teacher layers 2, 4, ..., 12 (1-based)
    assert layer_map(12, 12) == list(range(12))
    assert layer_map(12, 4) == [2, 5, 8, 11]
    assert layer_map(12, 1) == [11]
    assert layer_map(12, 6, explicit=(0, 2, 4, 7, 9, 11)) == [0, 2, 4, 7, 9, 11]  # DistilBERT's
    assert layer_map(12, 5, explicit=[0, 3, 6, 9, 11]) == [0, 3, 6, 9, 11]


@pytest.mark.parametrize("args, message", [
    ((12, 13, None), "student layers 13: deeper than its 12-layer teacher"),
    ((12, 5, None), "12 teacher layers / 5 is not whole; give an explicit layer map"),
    ((12, 0, None), "needs at least one layer"),
    ((12, 3, (0, 4)), r"layer map 0,4 has 2 entries for a 3-layer student"),
    ((12, 2, (0, 12)), r"layer 12 is out of range for a 12-layer teacher"),
    ((12, 2, (-1, 3)), r"layer -1 is out of range"),
    ((12, 3, (0, 4, 4)), "is not strictly increasing"),
])
def test_layer_map_errors(args, message):
    with pytest.raises(InputError, match=message):
        layer_map(*args)


@pytest.mark.parametrize("spec, message", [
    (StudentSpec(hidden=48), "student hidden size 48: must be between 1 and the teacher's 32"),
    (StudentSpec(hidden=30), "student hidden size 30 is not a multiple of 4 attention heads"),
    (StudentSpec(heads=8), "student heads 8: must be between 1 and the teacher's 4"),
    (StudentSpec(hidden=32, heads=2), r"student head size 16 \(32 / 2 heads\) exceeds the teacher's 8; use at least 4 heads"),
    (StudentSpec(intermediate=65), "student intermediate size 65"),
    (StudentSpec(layers=6, layer_map=(0, 1, 2)), "layer map 0,1,2 has 3 entries for a 6-layer student"),
    (StudentSpec(layers=7), "not whole"),
    (StudentSpec(id2label=("a", "a")), "'a' is listed twice"),
])
def test_student_config_errors(teacher, spec, message):
    with pytest.raises(InputError, match=message):
        student_config(teacher[0], spec)


def test_student_config_defaults(teacher):
    t = teacher[0]
    s = student_config(t, StudentSpec(layers=6, hidden=16))
    assert (s.num_hidden_layers, s.hidden_size, s.num_attention_heads, s.intermediate_size) == (6, 16, 4, 32)
    assert s.id2label == LABELS and s.vocab_size == t.vocab_size and s.initializer_range == t.initializer_range
    assert student_config(t, StudentSpec(layer_map=(0, 5, 11))).num_hidden_layers == 3
    base_sized = student_config(XLMRConfig(), StudentSpec(layers=6, hidden=384))
    assert (base_sized.num_attention_heads, base_sized.head_dim, base_sized.intermediate_size) == (12, 32, 1536)


# --- copying --------------------------------------------------------------------------------

def test_identity_12_to_12(teacher):
    cfg, sd = teacher
    scfg, ssd = copy_weights(sd, cfg, StudentSpec())
    assert scfg == cfg
    assert ssd.keys() == sd.keys()
    for k in sd:
        assert torch.equal(ssd[k], sd[k]), k
        assert ssd[k].data_ptr() != sd[k].data_ptr(), f"{k} aliases the teacher"
    ids, mask = batch(cfg.vocab_size, [9, 4, 1, 7])
    with torch.no_grad():
        a = build_model(cfg, sd).eval()(ids, mask).logits
        b = build_model(scfg, ssd).eval()(ids, mask).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("spec, teacher_layers", [
    (StudentSpec(layers=6), [1, 3, 5, 7, 9, 11]),
    (StudentSpec(layers=4), [2, 5, 8, 11]),
    (StudentSpec(layer_map=(0, 2, 4, 7, 9, 11)), [0, 2, 4, 7, 9, 11]),
])
def test_fewer_layers_equal_teacher_subnetwork(teacher, spec, teacher_layers):
    cfg, sd = teacher
    scfg, ssd = copy_weights(sd, cfg, spec)
    assert scfg.num_hidden_layers == len(teacher_layers)
    assert scfg.replace(num_hidden_layers=cfg.num_hidden_layers) == cfg
    t_model, s_model = build_model(cfg, sd).eval(), build_model(scfg, ssd).eval()
    ids, mask = batch(cfg.vocab_size, [11, 5, 2, 8])
    keep = mask.bool()[:, None, None, :]
    with torch.no_grad():
        out = s_model(ids, mask, taps=Taps(layers=tuple(range(len(teacher_layers))), hidden=True, embeddings=True))
        x = t_model.embed(ids)
        torch.testing.assert_close(out.embeddings, x, atol=0, rtol=0)
        for i, k in enumerate(teacher_layers):
            x = t_model.layers[k](x, keep, None, Output(logits=x.new_empty(0)))
            torch.testing.assert_close(out.hidden[i], x, atol=ATOL, rtol=0, msg=f"student layer {i} vs teacher {k}")
        torch.testing.assert_close(out.logits, t_model.head(x), atol=ATOL, rtol=0)


def test_half_width_takes_evenly_spaced_elements(teacher):
    cfg, sd = teacher  # hidden 32, 4 heads of 8, intermediate 64
    scfg, ssd = copy_weights(sd, cfg, StudentSpec(layers=6, hidden=16))
    assert (scfg.hidden_size, scfg.num_attention_heads, scfg.head_dim, scfg.intermediate_size) == (16, 4, 4, 32)
    assert {k: tuple(v.shape) for k, v in ssd.items()} == expected_shapes(scfg)
    h, m = torch.arange(0, 32, 2), torch.arange(0, 64, 2)
    assert torch.equal(ssd["roberta.embeddings.word_embeddings.weight"], sd["roberta.embeddings.word_embeddings.weight"][:, h])
    assert torch.equal(ssd["roberta.embeddings.position_embeddings.weight"], sd["roberta.embeddings.position_embeddings.weight"][:, h])
    assert torch.equal(ssd["roberta.embeddings.token_type_embeddings.weight"], sd["roberta.embeddings.token_type_embeddings.weight"][:, h])
    assert torch.equal(ssd["roberta.embeddings.LayerNorm.weight"], sd["roberta.embeddings.LayerNorm.weight"][h])
    s, t = "roberta.encoder.layer.2.", "roberta.encoder.layer.5."  # student layer 3 <- teacher layer 6 (1-based)
    for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
        assert torch.equal(ssd[s + name + ".weight"], sd[t + name + ".weight"][h][:, h]), name
        assert torch.equal(ssd[s + name + ".bias"], sd[t + name + ".bias"][h]), name
    assert torch.equal(ssd[s + "intermediate.dense.weight"], sd[t + "intermediate.dense.weight"][m][:, h])
    assert torch.equal(ssd[s + "intermediate.dense.bias"], sd[t + "intermediate.dense.bias"][m])
    assert torch.equal(ssd[s + "output.dense.weight"], sd[t + "output.dense.weight"][h][:, m])
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
        assert torch.equal(ssd[s + name + ".weight"], sd[t + name + ".weight"][h])
        assert torch.equal(ssd[s + name + ".bias"], sd[t + name + ".bias"][h])
    assert torch.equal(ssd["classifier.dense.weight"], sd["classifier.dense.weight"][h][:, h])
    assert torch.equal(ssd["classifier.out_proj.weight"], sd["classifier.out_proj.weight"][:, h])
    assert torch.equal(ssd["classifier.out_proj.bias"], sd["classifier.out_proj.bias"])
    # a few single values: student (row 3, col 5) is teacher (row 6, col 10)
    q = sd[t + "attention.self.query.weight"]
    assert ssd[s + "attention.self.query.weight"][3, 5] == q[6, 10]
    assert ssd[s + "output.dense.weight"][7, 31] == sd[t + "output.dense.weight"][14, 62]
    ids, mask = batch(cfg.vocab_size, [6, 3])
    with torch.no_grad():
        logits = build_model(scfg, ssd).eval()(ids, mask).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_non_dividing_width_uses_linspace():
    cfg, sd = random_teacher(num_hidden_layers=4, hidden_size=40, num_attention_heads=4, intermediate_size=72)
    scfg, ssd = copy_weights(sd, cfg, StudentSpec(layers=2, hidden=12, intermediate=30))
    assert (scfg.head_dim, scfg.intermediate_size) == (3, 30)
    assert {k: tuple(v.shape) for k, v in ssd.items()} == expected_shapes(scfg)
    h = torch.linspace(0, 39, 12).round().long()  # 40 -> 12 does not divide
    m = torch.linspace(0, 71, 30).round().long()  # 72 -> 30 does not divide
    a = torch.cat([k * 10 + torch.linspace(0, 9, 3).round().long() for k in range(4)])  # head 10 -> 3, per head
    assert h.tolist() == [0, 4, 7, 11, 14, 18, 21, 25, 28, 32, 35, 39]
    assert torch.equal(ssd["roberta.embeddings.word_embeddings.weight"], sd["roberta.embeddings.word_embeddings.weight"][:, h])
    assert torch.equal(ssd["roberta.embeddings.LayerNorm.bias"], sd["roberta.embeddings.LayerNorm.bias"][h])
    s, t = "roberta.encoder.layer.0.", "roberta.encoder.layer.1."
    assert torch.equal(ssd[s + "attention.self.query.weight"], sd[t + "attention.self.query.weight"][a][:, h])
    assert torch.equal(ssd[s + "attention.output.dense.weight"], sd[t + "attention.output.dense.weight"][h][:, a])
    assert torch.equal(ssd[s + "intermediate.dense.weight"], sd[t + "intermediate.dense.weight"][m][:, h])
    assert torch.equal(ssd[s + "output.dense.bias"], sd[t + "output.dense.bias"][h])


def test_fewer_heads_copy_whole_teacher_heads(teacher):
    cfg, sd = teacher  # 4 heads of 8
    scfg, ssd = copy_weights(sd, cfg, StudentSpec(layers=6, hidden=16, heads=2))
    assert (scfg.num_attention_heads, scfg.head_dim) == (2, 8)
    a, h = torch.cat([torch.arange(0, 8), torch.arange(16, 24)]), torch.arange(0, 32, 2)  # teacher heads 0 and 2
    w = sd["roberta.encoder.layer.1.attention.self.value.weight"]
    assert torch.equal(ssd["roberta.encoder.layer.0.attention.self.value.weight"], w[a][:, h])
    build_model(scfg, ssd)


def test_labels_reordered_or_rejected(teacher):
    cfg, sd = teacher
    scfg, ssd = copy_weights(sd, cfg, StudentSpec(id2label=("pos", "neg", "neu")))
    assert scfg.id2label == ("pos", "neg", "neu")
    assert torch.equal(ssd["classifier.out_proj.weight"], sd["classifier.out_proj.weight"][[2, 0, 1]])
    assert torch.equal(ssd["classifier.out_proj.bias"], sd["classifier.out_proj.bias"][[2, 0, 1]])
    with pytest.raises(InputError, match="differ from the teacher's neg,neu,pos; .*use from-base for new labels"):
        copy_weights(sd, cfg, StudentSpec(id2label=("a", "b", "c")))


def test_bad_teacher_state_dict(teacher):
    cfg, sd = teacher
    with pytest.raises(InputError, match="'roberta.encoder.layer.3.output.dense.bias' is missing"):
        copy_weights({k: v for k, v in sd.items() if k != "roberta.encoder.layer.3.output.dense.bias"}, cfg, StudentSpec())
    with pytest.raises(InputError, match="'classifier.out_proj.bias' is missing"):
        copy_weights({k: v for k, v in sd.items() if k != "classifier.out_proj.bias"}, cfg, StudentSpec())
    with pytest.raises(InputError, match="unexpected tensor 'extra.weight'"):
        copy_weights({**sd, "extra.weight": torch.zeros(1)}, cfg, StudentSpec())
    with pytest.raises(InputError, match="has shape"):
        copy_weights(sd, cfg.replace(intermediate_size=60), StudentSpec())
    # no head: the encoder is copied and the head left to the caller
    _, body = copy_weights({k: v for k, v in sd.items() if not k.startswith("classifier.")}, cfg, StudentSpec(layers=6))
    assert not any(k.startswith("classifier.") for k in body)


# --- from-base, from-scratch, init_student ---------------------------------------------------

@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    from transformers import XLMRobertaForMaskedLM

    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("base")
    XLMRobertaForMaskedLM(hf_config(id2label=None, label2id=None)).save_pretrained(d)
    return d


def test_from_base_ignores_lm_head_and_starts_a_fresh_head(mlm_dir, teacher_dir):
    _, base_sd = read_hf_state_dict(mlm_dir, init_missing_classifier=False)
    labels = ("a", "b", "c", "d", "e")
    cfg, sd = init_student("from-base", StudentSpec(layers=6, hidden=16, id2label=labels), base=mlm_dir, seed=3)
    assert cfg.id2label == labels and cfg.num_hidden_layers == 6 and cfg.hidden_size == 16
    assert not any(k.startswith("lm_head") for k in sd)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(cfg)
    h = torch.arange(0, 32, 2)
    assert torch.equal(sd["roberta.encoder.layer.0.intermediate.dense.bias"], base_sd["roberta.encoder.layer.1.intermediate.dense.bias"][::2])
    assert torch.equal(sd["roberta.embeddings.word_embeddings.weight"], base_sd["roberta.embeddings.word_embeddings.weight"][:, h])
    w = sd["classifier.out_proj.weight"]
    assert w.shape == (5, 16) and 0.005 < w.std() < 0.04 and not sd["classifier.out_proj.bias"].any()
    assert not sd["classifier.dense.bias"].any()
    _, again = init_student("from-base", StudentSpec(layers=6, hidden=16, id2label=labels), base=mlm_dir, seed=3)
    assert torch.equal(again["classifier.dense.weight"], sd["classifier.dense.weight"])  # seeded
    _, other = init_student("from-base", StudentSpec(layers=6, hidden=16, id2label=labels), base=mlm_dir, seed=4)
    assert not torch.equal(other["classifier.dense.weight"], sd["classifier.dense.weight"])
    # with a teacher and no label list: the teacher's labels
    cfg_t, _ = init_student("from-base", StudentSpec(layers=6), base=mlm_dir, teacher=teacher_dir)
    assert cfg_t.id2label == LABELS


def test_from_scratch_statistics():
    cfg = XLMRConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=40, initializer_range=0.05)
    sd = scratch_state_dict(cfg, seed=0)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(cfg)
    word = sd["roberta.embeddings.word_embeddings.weight"]
    assert not word[cfg.pad_token_id].any() and not sd["roberta.embeddings.position_embeddings.weight"][cfg.pad_token_id].any()
    assert abs(word.std().item() - 0.05) < 0.003 and abs(word.mean().item()) < 0.003
    up = sd["roberta.encoder.layer.1.intermediate.dense.weight"]
    assert abs(up.std().item() - 0.05) < 0.003
    assert torch.equal(sd["roberta.encoder.layer.0.output.LayerNorm.weight"], torch.ones(64))
    assert not sd["roberta.encoder.layer.0.output.LayerNorm.bias"].any()
    assert not sd["roberta.encoder.layer.0.attention.self.query.bias"].any()
    assert torch.equal(scratch_state_dict(cfg, seed=0)["classifier.dense.weight"], sd["classifier.dense.weight"])
    assert not torch.equal(scratch_state_dict(cfg, seed=1)["classifier.dense.weight"], sd["classifier.dense.weight"])


def test_init_student_dispatch_and_errors(teacher_dir, mlm_dir, teacher):
    cfg, sd = init_student("from-teacher", StudentSpec(layers=6), teacher=teacher_dir)
    assert torch.equal(sd["roberta.encoder.layer.0.output.dense.weight"], teacher[1]["roberta.encoder.layer.1.output.dense.weight"])
    scfg, ssd = init_student("from-scratch", StudentSpec(layers=3, hidden=16), teacher=teacher_dir, seed=0)
    assert (scfg.num_hidden_layers, scfg.hidden_size, scfg.id2label) == (3, 16, LABELS)
    build_model(scfg, ssd)
    with pytest.raises(InputError, match="unknown initialization; choose one of from-teacher, from-base, from-scratch"):
        init_student("from-nowhere", StudentSpec(), teacher=teacher_dir)
    with pytest.raises(InputError, match="from-teacher needs the teacher"):
        init_student("from-teacher", StudentSpec(), base=mlm_dir)
    with pytest.raises(InputError, match="from-base needs the pretrained base"):
        init_student("from-base", StudentSpec(), teacher=teacher_dir)
    with pytest.raises(InputError, match="from-scratch takes its sizes"):
        init_student("from-scratch", StudentSpec())
    with pytest.raises(InputError, match="has no classification head; use --init from-base"):
        init_student("from-teacher", StudentSpec(), teacher=mlm_dir)


# --- command line -----------------------------------------------------------------------------

def test_cli_writes_a_student_transformers_loads(tmp_path, teacher_dir, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "student"
    main(["--teacher", str(teacher_dir), "--layers", "6", "--hidden", "16", "--out", str(out)])
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("from-teacher: source layers 1,3,5,7,9,11 (0-based) -> 6 layers; hidden 32->16, heads 4x8->4x4, intermediate 64->32")
    assert "M ->" in summary and len(summary.splitlines()) == 1
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((teacher_dir / "tokenizer.json").read_text())
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6

    hf, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    cfg, sd = read_hf_state_dict(out, init_missing_classifier=False)
    ours = build_model(cfg, sd).eval()
    ids, mask = batch(cfg.vocab_size, [10, 4, 7])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).logits, hf.eval()(input_ids=ids, attention_mask=mask).logits, atol=ATOL, rtol=0)


def test_cli_refuses_non_empty_out_and_bad_flags(tmp_path, teacher_dir, capsys):
    out = tmp_path / "student"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["--teacher", str(teacher_dir), "--layers", "4", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "directory is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    main(argv + ["--overwrite"])
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model.safetensors").is_file()
    for bad, message in [
        (["--out", str(teacher_dir), "--overwrite"], "contains the input --teacher"),
        (["--out", str(tmp_path / "x"), "--layers", "5"], "not whole; give an explicit layer map (--layer-map"),
        (["--out", str(tmp_path / "x"), "--layer-map", "0,2,x"], "--layer-map 0,2,x: expected integers"),
        (["--out", str(tmp_path / "x"), "--layers", "13"], "deeper than its 12-layer teacher"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["--teacher", str(teacher_dir), *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_cli_explicit_map_and_from_scratch(tmp_path, teacher_dir, capsys):
    main(["--teacher", str(teacher_dir), "--layer-map", "0", "2", "4", "7", "9", "11", "--out", str(tmp_path / "a")])
    assert "source layers 0,2,4,7,9,11 (0-based) -> 6 layers" in capsys.readouterr().out
    main(["--init", "from-scratch", "--teacher", str(teacher_dir), "--layers", "2", "--labels", "x,y", "--out", str(tmp_path / "b")])
    assert "from-scratch: source layers none (random init)" in capsys.readouterr().out
    cfg = XLMRConfig.from_hf(tmp_path / "b")
    assert cfg.id2label == ("x", "y") and cfg.num_hidden_layers == 2


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "xlmr_mini.copy_weights", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--layer-map" in r.stdout and "from-scratch" in r.stdout
