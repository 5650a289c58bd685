"""The tokenizer wrapper on XLM-R's real tokenizer.json, and parity with transformers' tokenizer."""
import json

import pytest
from conftest import SHARED, XLMR_TOKENIZER, requires_shared

from xlmr_mini.checkpoint import save_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import scratch_state_dict
from xlmr_mini.data import build_demo, encode_split, load_task
from xlmr_mini.errors import InputError
from xlmr_mini.tokenizer import Tokenizer
from xlmr_mini.trim import UNTRUNCATED, main as trim_main

TSM, MASSIVE = SHARED / "data" / "tweet_sentiment_multilingual", SHARED / "data" / "massive" / "1.1" / "data"
# Whitespace that the original SentencePiece model (and transformers) never turns into pieces.
SPACED = ["ends in a space ", " starts with one", "two  inside", "\ttab and\nnewline\n", " ", ""]


def tiny_config(positions: int = 130, **overrides) -> XLMRConfig:
    kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
              max_position_embeddings=positions, id2label=("negative", "neutral", "positive"))
    return XLMRConfig(**{**kw, **overrides})


def transformers_ids(model_dir, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(texts).input_ids


@pytest.fixture(scope="module")
def xlmr():
    return Tokenizer(XLMR_TOKENIZER)


@requires_shared("tokenizers", "xlm-roberta", "tokenizer.json")
def test_real_xlmr_tokenizer_ids(xlmr):
    tok = xlmr
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 250002)
    assert tok.encode_ids(["Hello, my dog is cute"]) == [[0, 35378, 4, 759, 10269, 83, 99942, 2]]
    # XLM-R's tokenizer.json as published adds a `▁` piece (id 6) for a trailing space; SentencePiece
    # and transformers do not, and neither does this tokenizer.
    assert tok.encode_ids(["... this time around. ", "  Hello,   my dog is cute  "]) == [
        [0, 153, 903, 1733, 10932, 5, 2], [0, 35378, 4, 759, 10269, 83, 99942, 2]]


@requires_shared("tokenizers", "xlm-roberta", "tokenizer.json")
def test_truncation_and_dynamic_padding(xlmr):
    tok = xlmr
    ids = tok.encode_ids(["Hello, my dog is cute", "Hi"], max_length=5)
    assert ids == [[0, 35378, 4, 759, 2], [0, 2673, 2]]
    input_ids, mask = tok.pad(ids)
    assert input_ids.tolist() == [[0, 35378, 4, 759, 2], [0, 2673, 2, 1, 1]]  # longest in batch, pad 1
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_missing_or_bad_tokenizer_file(tmp_path):
    with pytest.raises(InputError, match="tokenizer.json not found"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(InputError, match="not a valid tokenizer.json"):
        Tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------
# Parity with transformers' AutoTokenizer on saved model directories
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_student(tmp_path_factory):
    """A tiny random student over the demo's tokenizer, saved as an HF directory."""
    root = tmp_path_factory.mktemp("demo_student")
    task = build_demo(root / "cache")
    cfg = tiny_config(vocab_size=Tokenizer(task.tokenizer_path).vocab_size, id2label=task.labels)
    save_hf(root / "model", cfg, scratch_state_dict(cfg, 0), task.tokenizer_path)
    return root, task


def test_demo_tokenizer_is_xlmr_like_and_transformers_agrees(demo_student):
    from transformers import AutoTokenizer, XLMRobertaTokenizer

    root, task = demo_student
    saved = json.loads((root / "model" / "tokenizer.json").read_text())
    assert saved["model"]["type"] == "Unigram" and saved["model"]["unk_id"] == 3
    hf = AutoTokenizer.from_pretrained(root / "model")
    assert isinstance(hf, XLMRobertaTokenizer) and (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf.model_max_length == 128 and len(hf) == Tokenizer(task.tokenizer_path).vocab_size
    texts = [t for split in task.splits.values() for t in split.texts]
    tok = Tokenizer(root / "model")
    ours = tok.encode_ids(texts + SPACED, UNTRUNCATED)
    assert hf(texts + SPACED).input_ids == ours
    assert all(ids[0] == 0 and ids[-1] == 2 for ids in ours)
    # Leading, trailing and repeated spaces change nothing.
    assert tok.encode_ids([f"  {t.replace(' ', '   ')} " for t in texts], UNTRUNCATED) == ours[: len(texts)]


def test_trim_and_pipeline_on_a_demo_student(demo_student):
    """`trim` works on the demo's Unigram tokenizer; transformers' pipeline truncates long text to
    the model's positions (tokenizer_config.json's model_max_length) instead of crashing."""
    from transformers import pipeline

    root, task = demo_student
    summary = trim_main([str(root / "model"), "--data", "demo", "--out", str(root / "trimmed"),
                         "--cache-dir", str(root / "cache")])
    assert summary["kept"] < summary["vocab"]
    texts = task.splits["test"].texts + SPACED
    assert transformers_ids(root / "trimmed", texts) == Tokenizer(root / "trimmed").encode_ids(texts, UNTRUNCATED)
    config = json.loads((root / "trimmed" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 128 and config["pad_token"] == "<pad>" and config["mask_token"] == "<mask>"
    classify = pipeline("text-classification", model=str(root / "model"))
    long_text = " ".join(task.splits["dev"].texts)[:3000]  # ~300 words, far over 128 tokens
    (result,) = classify(long_text, truncation=True)
    assert result["label"] in task.labels and 0 < result["score"] <= 1


@requires_shared("tokenizers", "xlm-roberta", "tokenizer.json")
@requires_shared("data", "tweet_sentiment_multilingual")
@requires_shared("data", "massive", "1.1", "data")
def test_every_tsm_and_massive_text_tokenizes_as_in_transformers(xlmr, tmp_path):
    """Training's tokenizer, `tokenizers` on the saved tokenizer.json and transformers' AutoTokenizer
    give the same ids on every text of both datasets, with the full and the trimmed vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer

    cfg = tiny_config()
    save_hf(tmp_path / "full", cfg, scratch_state_dict(cfg, 0), XLMR_TOKENIZER)
    tok = Tokenizer(tmp_path / "full")
    # Training reads the published file through the same pipeline as the saved one.
    assert json.loads(xlmr._tok.to_str()) == json.loads(tok._tok.to_str())
    full_vocab = tok._tok.get_vocab()
    for spec in (f"tsm:{TSM}", f"massive:{MASSIVE}"):
        splits = load_task(spec).splits.values()
        texts = [t for split in splits for t in split.texts]
        encoded = [encode_split(split, tok, UNTRUNCATED, cache_dir=tmp_path / "cache") for split in splits]
        ours = [e.tokens[a:b].tolist() for e in encoded for a, b in zip(e.offsets[:-1], e.offsets[1:])]
        assert transformers_ids(tmp_path / "full", texts) == ours, spec
        trimmed_dir = tmp_path / spec.split(":")[0]
        trim_main([str(tmp_path / "full"), "--data", spec, "--out", str(trimmed_dir), "--cache-dir", str(tmp_path / "cache")])
        trimmed = [e.ids for e in HFTokenizer.from_file(str(trimmed_dir / "tokenizer.json")).encode_batch(texts)]
        assert transformers_ids(trimmed_dir, texts) == trimmed, spec
        kept = [full_vocab[piece] for piece, _ in json.loads((trimmed_dir / "tokenizer.json").read_text())["model"]["vocab"]]
        assert [[kept[i] for i in ids] for ids in trimmed] == ours, spec
