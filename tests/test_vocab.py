"""Exact vocabulary trimming (`xlmr_mini.vocab`, `python -m xlmr_mini.trim`) and `--precision`."""
import contextlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TSM, XLMR_TOKENIZER, requires_shared
from xlmr_mini import hardware
from xlmr_mini.checkpoint import load_model, save_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import scratch_state_dict
from xlmr_mini.data import EncodedSplit, load_task
from xlmr_mini.errors import InputError
from xlmr_mini.kd_loss import HiddenProjection, KDLossConfig, kd_taps
from xlmr_mini.kd_step import forward_loss, make_optimizer
from xlmr_mini.model import XLMRClassifier, init_weights
from xlmr_mini.tokenizer import Tokenizer
from xlmr_mini.train import main as train_main
from xlmr_mini.trim import main as trim_main
from xlmr_mini.vocab import (
    WORD_KEY, VocabTrim, expand_state_dict, kept_ids, trim_state_dict, unk_rates, weight_decay_scale,
)

real_tweets = [requires_shared("data", "tweet_sentiment_multilingual"),
               requires_shared("tokenizers", "xlm-roberta", "tokenizer.json")]


def _enc(rows: list[list[int]], langs: list[str]) -> EncodedSplit:
    offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    return EncodedSplit(np.array([t for r in rows for t in r], dtype=np.int32), offsets,
                        np.zeros(len(rows), dtype=np.int64), langs)


def test_kept_ids_remap_both_ways_and_count_unk():
    enc = _enc([[0, 17, 3, 2], [0, 42, 17, 9, 2]], ["en", "fr"])
    trim = kept_ids([enc.tokens], full_size=50, always=[0, 1, 2, 3, 49])
    assert trim.kept.tolist() == [0, 1, 2, 3, 9, 17, 42, 49]
    task = trim.to_task(enc)
    assert task.tokens.tolist() == [0, 5, 3, 2, 0, 6, 5, 4, 2] and task.tokens.dtype == np.int32
    assert trim.to_full(task).tokens.tolist() == enc.tokens.tolist()
    with pytest.raises(ValueError, match=r"\[5\]"):
        trim.to_task(_enc([[0, 5, 2]], ["en"]))
    overall, per_lang = unk_rates(enc, unk_id=3)
    assert overall == pytest.approx(1 / 5) and per_lang == {"en": 0.5, "fr": 0.0}


def test_weight_decay_closed_form_matches_adamw_on_rows_without_gradient():
    """AdamW (fused, linear decay) never moves a zero-gradient row except by weight decay, whose
    product `expand_state_dict` applies in closed form."""
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(7, 5))
    start = table.detach().clone()
    opt = make_optimizer([table], 1e-2, weight_decay=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (20 - step) / 20)
    used = []
    for _ in range(15):
        used.append(opt.param_groups[0]["lr"])
        table.grad = torch.zeros_like(table)
        table.grad[[1, 4]] = torch.randn(2, 5)
        opt.step()
        sched.step()
    trim = VocabTrim(kept=np.array([1, 4]), full_size=7, initial_rows=start)
    state = trim_state_dict({WORD_KEY: table.detach()}, trim)
    assert state[WORD_KEY].shape == (2, 5)
    full = expand_state_dict(state, trim, weight_decay_scale(used, 0.5))[WORD_KEY]
    torch.testing.assert_close(full, table.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(expand_state_dict(state, trim)[WORD_KEY][[0, 2, 3, 5, 6]], start[[0, 2, 3, 5, 6]])


# ---------------------------------------------------------------------------------------------
# Real tweets and XLM-R's real tokenizer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trimmed_tsm(tmp_path_factory):
    """A tiny random model over XLM-R's vocabulary, and its trim to every tsm text."""
    root = tmp_path_factory.mktemp("trim")
    cfg = XLMRConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=130, id2label=("negative", "neutral", "positive"))
    save_hf(root / "full", cfg, scratch_state_dict(cfg, 0), XLMR_TOKENIZER)
    summary = trim_main([str(root / "full"), "--data", f"tsm:{TSM}", "--out", str(root / "trimmed"),
                         "--cache-dir", str(root / "cache")])
    return root, summary


@real_tweets[0]
@real_tweets[1]
def test_trimmed_tokenizer_segments_every_tweet_as_the_full_one(trimmed_tsm):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    root, summary = trimmed_tsm
    assert 30_000 < summary["kept"] < 45_000 and summary["vocab"] == 250_002
    full, trimmed = (HFTokenizer.from_file(str(root / d / "tokenizer.json")) for d in ("full", "trimmed"))
    texts = [t for split in load_task(f"tsm:{TSM}").splits.values() for t in split.texts]
    a, b = full.encode_batch(texts), trimmed.encode_batch(texts)
    assert sum(x.tokens != y.tokens for x, y in zip(a, b)) == 0
    kept = np.array(sorted({i for e in a for i in e.ids} | {0, 1, 2, 3, 250_001}))
    for x, y in list(zip(a, b))[::97]:  # ids renumbered consistently
        assert [int(np.searchsorted(kept, i)) for i in x.ids] == y.ids
    hf = AutoTokenizer.from_pretrained(root / "trimmed")
    assert hf(texts[:50]).input_ids == [e.ids for e in b[:50]]
    assert (hf.pad_token_id, hf.unk_token_id, hf.mask_token_id) == (1, 3, summary["kept"] - 1)
    # Text outside the kept pieces still tokenizes, falling back to smaller pieces or <unk>.
    odd = trimmed.encode("Привет, 你好 zzqxj")
    assert odd.ids[0] == 0 and odd.ids[-1] == 2 and 3 in odd.ids and "▁z" in odd.tokens


@real_tweets[0]
@real_tweets[1]
def test_trimmed_model_gives_the_full_models_logits_and_reports_unk(trimmed_tsm, capsys):
    from xlmr_mini.evaluate import main as evaluate_main

    root, summary = trimmed_tsm
    full, trimmed = load_model(root / "full").eval(), load_model(root / "trimmed").eval()
    assert trimmed.cfg.vocab_size == summary["kept"] and summary["trimmed_parameters"] < summary["parameters"] / 5
    texts = load_task(f"tsm:{TSM}").splits["dev"].texts[:40]
    with torch.no_grad():
        a = full(*Tokenizer(root / "full")(texts)).logits
        b = trimmed(*Tokenizer(root / "trimmed")(texts)).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    scores = evaluate_main(["--model", str(root / "trimmed"), "--data", f"tsm:{TSM}", "--langs", "english,hindi",
                            "--cache-dir", str(root / "cache")])
    assert scores["overall"]["unk_rate"] == 0.0 and set(scores["languages"]["hindi"]) >= {"unk_rate", "micro_f1"}
    assert "<unk>" in capsys.readouterr().out


@real_tweets[0]
@real_tweets[1]
def test_real_tweets_trimmed_training_equals_full_and_saves_a_task_vocabulary(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = tmp_path / "base"
    cfg = XLMRConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=130)
    save_hf(base, cfg, scratch_state_dict(cfg, 0), XLMR_TOKENIZER)
    common = ["--init", "from-base", "--base", str(base), "--no-kd", "--data", f"tsm:{TSM}", "--subset", "0.02",
              "--max-length", "32", "--max-steps", "5", "--eval-steps", "5", "--cache-dir", str(tmp_path / "c"),
              "--num-threads", "1", "--eval-batch-size", "256", "--precision", "fp32"]
    full = train_main(common + ["--out", str(tmp_path / "full"), "--no-trim"])
    task = train_main(common + ["--out", str(tmp_path / "task"), "--save-vocab", "task"])
    assert task["student"]["vocab"] == task["trained_vocab"] < 40_000 and full["student"]["vocab"] == 250_002
    losses = [[json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
               if json.loads(x)["type"] == "train"] for n in ("full", "task")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert task["final"]["overall"]["micro_f1"] == pytest.approx(full["final"]["overall"]["micro_f1"], abs=1e-9)
    rows = load_file(tmp_path / "task" / "best" / "model.safetensors")[WORD_KEY]
    full_rows = load_file(tmp_path / "full" / "best" / "model.safetensors")[WORD_KEY]
    kept = json.loads((tmp_path / "task" / "best" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(kept) == rows.shape[0]
    # transformers loads the task-vocabulary model and tokenizer and agrees with the full model.
    text = load_task(f"tsm:{TSM}").splits["dev"].texts[:3]
    hf_tok, hf = AutoTokenizer.from_pretrained(tmp_path / "task" / "best"), AutoModelForSequenceClassification.from_pretrained(tmp_path / "task" / "best").eval()
    full_model = load_model(tmp_path / "full" / "best").eval()
    with torch.no_grad():
        got = hf(**hf_tok(text, return_tensors="pt", padding=True)).logits
        want = full_model(*Tokenizer(tmp_path / "full" / "best")(text)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert full_rows.shape[0] == 250_002


def test_trim_rejects_a_bpe_tokenizer_with_one_line(tmp_path, capsys):
    from tokenizers import Tokenizer as HFTokenizer, models

    cfg = XLMRConfig(vocab_size=6, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                     max_position_embeddings=20, id2label=("a", "b"))
    tok = HFTokenizer(models.BPE(vocab={"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5}, merges=[],
                                 unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    save_hf(tmp_path / "m", cfg, scratch_state_dict(cfg, 0), tmp_path / "tokenizer.json")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b", "label": "a", "lang": "en", "split": "train"}\n')
    with pytest.raises(SystemExit) as e:
        trim_main([str(tmp_path / "m"), "--data", f"file:{data}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Unigram" in err


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------
def test_cpus_sold_under_one_name_but_with_other_bf16_units_are_probed_apart(tmp_path, monkeypatch):
    """A cloud's "AMD EPYC" with avx512_bf16 and one with AVX2 only: bf16 decided for each by its own probe."""
    with_bf16 = "model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 sha_ni\n"
    avx2 = "model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 sha_ni\n"
    assert hardware.cpu_model(with_bf16) == "AMD EPYC (avx2, avx512f, avx512_bf16)"
    assert hardware.cpu_model(avx2) == "AMD EPYC (avx2)"
    assert hardware.cpu_model("model name : Neoverse-V2\nFeatures : fp asimd sve bf16\n") == "Neoverse-V2 (asimd, sve, bf16)"
    speed, read = {"AMD EPYC (avx2, avx512f, avx512_bf16)": 3.0, "AMD EPYC (avx2)": 0.0125}, hardware.cpu_model
    for info in (with_bf16, avx2):
        monkeypatch.setattr(hardware, "cpu_model", lambda info=info: read(info))
        monkeypatch.setattr(hardware, "_bf16_probe", lambda: {"cpu": hardware.cpu_model(),
                                                               "speedup": speed[hardware.cpu_model()]})
        assert hardware.cpu_bf16_speedup(tmp_path)["speedup"] == speed[hardware.cpu_model()]
    assert len(list((tmp_path / "hardware").iterdir())) == 2


def test_precision_auto_resolves_and_caches_the_probe(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    assert hardware.resolve_precision("fp32", cpu, 768, tmp_path) == "fp32"
    assert hardware.resolve_precision("bf16", cpu, 64, tmp_path) == "bf16"
    assert hardware.resolve_precision("auto", cpu, 64, tmp_path) == "fp32"  # tiny: no probe
    assert not (tmp_path / "hardware").exists()
    probe = hardware.cpu_bf16_speedup(tmp_path)
    assert probe["fp32_s"] > 0 and probe["bf16_s"] > 0 and probe["cpu"] == hardware.cpu_model()
    expected = "bf16" if probe["speedup"] >= hardware.MIN_BF16_SPEEDUP else "fp32"
    assert hardware.resolve_precision("auto", cpu, 768, tmp_path) == expected
    (cached,) = (tmp_path / "hardware").iterdir()
    monkeypatch.setattr(hardware, "_median_time", lambda *a, **k: pytest.fail("probed again"))
    for speedup, want in ((0.3, "fp32"), (4.0, "bf16")):  # the cached result decides, no new probe
        cached.write_text(json.dumps({**probe, "speedup": speedup}))
        assert hardware.resolve_precision("auto", cpu, 768, tmp_path) == want


def test_precision_asks_the_runs_gpu_for_native_bf16(tmp_path, monkeypatch):
    """cuda:1 is a V100 (bf16 only emulated) while the current device, cuda:0, is an A100: auto
    gives fp32 on cuda:1 and bf16 on cuda:0, and bf16 on cuda:1 is bad input. Stand-ins for the
    CUDA calls: the device guard sets the current device, `is_bf16_supported` answers for it."""
    current = [0]

    @contextlib.contextmanager
    def device(d):
        current.append(torch.device(d).index)
        yield
        current.pop()

    def is_bf16_supported(including_emulation=True):
        return current[-1] == 0 or including_emulation  # cuda:1: emulated only

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    v100, a100 = torch.device("cuda", 1), torch.device("cuda", 0)
    assert hardware.resolve_precision("auto", v100, 768, tmp_path) == "fp32"
    assert hardware.resolve_precision("auto", a100, 768, tmp_path) == "bf16"
    with pytest.raises(InputError, match="--precision bf16: Tesla V100 does not support bfloat16"):
        hardware.resolve_precision("bf16", v100, 768, tmp_path)


def test_bf16_kd_step_tracks_fp32():
    """The KD loss and its gradients under bf16 autocast stay within 3% of fp32 (the loss terms
    themselves are computed in fp32; the error is the bf16 matmuls')."""
    def model(layers, seed):
        torch.manual_seed(seed)
        cfg = XLMRConfig(vocab_size=300, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=512, max_position_embeddings=40, id2label=("a", "b", "c"))
        m = XLMRClassifier(cfg)
        init_weights(m, 0.05)
        return m

    teacher, student = model(2, 0).eval(), model(1, 1).eval()  # eval: no dropout, the same function twice
    proj = HiddenProjection(256, 256)
    loss_cfg = KDLossConfig()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (4, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:], mask[3, 7:] = 0, 0
    labels = torch.tensor([0, 2, 1, 1])
    results = {}
    for bf16 in (False, True):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            t_out = teacher(ids, mask, kd_taps(loss_cfg, [1]))
        student.zero_grad()
        total, terms = forward_loss(student, proj, ids, mask, labels, t_out, loss_cfg, [1], bf16)
        total.backward()
        assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
        grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        results[bf16] = (total.item(), {k: v.item() for k, v in terms.items()}, grad)
    (l32, t32, g32), (l16, t16, g16) = results[False], results[True]
    assert l16 == pytest.approx(l32, rel=0.03)
    for k in t32:
        assert t16[k] == pytest.approx(t32[k], rel=0.05, abs=1e-4), k
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
