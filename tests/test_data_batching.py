"""Subsets, the token cache, length-bucketed batches, and the built-in demo task."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from xlmr_mini.data import (
    EncodedSplit, Split, build_demo, encode_split, epoch_batches, load_task, select_languages, stratified_subset,
)
from xlmr_mini.data.demo import DEMO_VERSION, generate_demo
from xlmr_mini.errors import InputError
from xlmr_mini.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def demo(demo_cache):
    return build_demo(demo_cache)


@pytest.fixture(scope="module")
def tokenizer(demo):
    return Tokenizer(demo.tokenizer_path)


def toy_split(counts: dict[tuple[str, int], int]) -> Split:
    texts, labels, langs = [], [], []
    for (lang, label), n in counts.items():
        for i in range(n):
            texts.append(f"{lang} {label} {i}")
            labels.append(label)
            langs.append(lang)
    order = np.random.default_rng(0).permutation(len(texts))
    return Split([texts[i] for i in order], np.asarray(labels, np.int64)[order], [langs[i] for i in order])


# ---------------------------------------------------------------------------------------------
# Subsets


def test_subset_keeps_rare_classes_and_totals():
    split = toy_split({("a", 0): 500, ("a", 1): 37, ("a", 2): 1, ("b", 0): 3, ("b", 3): 90})
    sub = stratified_subset(split, 0.05, seed=0)
    got = {(lang, int(label)): 0 for lang, label in zip(split.langs, split.labels)}
    for lang, label in zip(sub.langs, sub.labels):
        got[(lang, int(label))] += 1
    # a: round(0.05 * 538) = 27 in all; the lone class-2 example takes the slot class 1 would get by remainder
    assert got == {("a", 0): 25, ("a", 1): 1, ("a", 2): 1, ("b", 0): 1, ("b", 3): 4}
    positions = {t: i for i, t in enumerate(split.texts)}
    assert [positions[t] for t in sub.texts] == sorted(positions[t] for t in sub.texts)  # original order


def test_subset_is_seeded_and_independent_of_other_languages():
    split = toy_split({("a", 0): 200, ("a", 1): 100, ("b", 0): 50})
    only_a = select_languages_by(split, "a")
    sub = stratified_subset(split, 0.1, seed=7)
    assert stratified_subset(split, 0.1, seed=7).texts == sub.texts
    assert stratified_subset(split, 0.1, seed=8).texts != sub.texts
    assert [t for t, lang in zip(sub.texts, sub.langs) if lang == "a"] == stratified_subset(only_a, 0.1, seed=7).texts
    assert stratified_subset(split, 1.0, seed=0) is split
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InputError, match="subset fraction"):
            stratified_subset(split, bad, seed=0)


def select_languages_by(split: Split, lang: str) -> Split:
    return split.take([i for i, x in enumerate(split.langs) if x == lang])


# ---------------------------------------------------------------------------------------------
# Encoding cache


def test_encode_cache_hit_and_corrupt_entry_rebuilt(demo, tokenizer, tmp_path):
    split = demo.splits["dev"]
    enc = encode_split(split, tokenizer, 64, cache_dir=tmp_path)
    entries = list((tmp_path / "encoded").glob("*.npz"))
    assert len(entries) == 1 and not list((tmp_path / "encoded").glob("*.tmp"))
    assert enc.ids[5].tolist() == tokenizer.encode_ids([split.texts[5]], 64)[0]
    assert enc.lengths.tolist() == [len(x) for x in tokenizer.encode_ids(split.texts, 64)]
    before = entries[0].stat().st_mtime_ns
    again = encode_split(split, tokenizer, 64, cache_dir=tmp_path)
    assert entries[0].stat().st_mtime_ns == before and np.array_equal(again.tokens, enc.tokens)
    # Other max_length or other texts: other entries.
    encode_split(split, tokenizer, 8, cache_dir=tmp_path)
    encode_split(split.take(range(10)), tokenizer, 64, cache_dir=tmp_path)
    assert len(list((tmp_path / "encoded").glob("*.npz"))) == 3
    for garbage in (b"not an npz", entries[0].read_bytes()[:100]):
        entries[0].write_bytes(garbage)
        rebuilt = encode_split(split, tokenizer, 64, cache_dir=tmp_path)
        assert np.array_equal(rebuilt.tokens, enc.tokens) and np.array_equal(rebuilt.offsets, enc.offsets)
    # A well-formed file with wrong contents (ids outside the vocabulary) is not trusted either.
    np.savez(entries[0], tokens=np.full(len(enc.tokens), 10**6, np.int32), offsets=enc.offsets)
    assert np.array_equal(encode_split(split, tokenizer, 64, cache_dir=tmp_path).tokens, enc.tokens)


def test_encode_default_cache_dir_from_env(demo, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("XLMR_MINI_CACHE", str(tmp_path / "env"))
    encode_split(demo.splits["dev"].take(range(3)), tokenizer, 32)
    assert len(list((tmp_path / "env" / "encoded").glob("*.npz"))) == 1
    encode_split(demo.splits["dev"].take(range(4)), tokenizer, 32, cache_dir=False)
    assert len(list((tmp_path / "env" / "encoded").glob("*.npz"))) == 1


# ---------------------------------------------------------------------------------------------
# Batches


def make_encoded(lengths) -> EncodedSplit:
    lengths = np.asarray(lengths, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.concatenate([np.full(n, 10 + i, np.int32) for i, n in enumerate(lengths)])
    return EncodedSplit(tokens, offsets, np.arange(len(lengths), dtype=np.int64) % 5, [f"l{i % 3}" for i in range(len(lengths))])


@pytest.mark.parametrize("n,batch_size", [(1, 7), (129, 7), (1000, 32)])
def test_epoch_batches_cover_each_example_once(n, batch_size):
    enc = make_encoded(np.random.default_rng(n).integers(3, 60, n))
    batches = epoch_batches(enc, batch_size, seed=1, epoch=2, pad_id=1)
    assert len(batches) == -(-n // batch_size)
    seen = np.concatenate([b["index"].numpy() for b in batches])
    assert sorted(seen.tolist()) == list(range(n))
    for b in batches:
        idx = b["index"].numpy()
        assert b["input_ids"].dtype == torch.int64 and b["attention_mask"].dtype == torch.int64
        assert b["input_ids"].shape == b["attention_mask"].shape == (len(idx), enc.lengths[idx].max())
        assert b["attention_mask"].sum(1).tolist() == enc.lengths[idx].tolist()
        assert b["labels"].tolist() == enc.labels[idx].tolist() and b["langs"] == [enc.langs[i] for i in idx]
        for row, i in enumerate(idx):  # real tokens, then pad_id
            assert b["input_ids"][row, : enc.lengths[i]].tolist() == enc.ids[i].tolist()
            assert (b["input_ids"][row, enc.lengths[i]:] == 1).all()


def test_epoch_batches_deterministic_resumable_and_bucketed():
    enc = make_encoded(np.random.default_rng(0).integers(3, 120, 5000))
    a = epoch_batches(enc, 16, seed=3, epoch=4, pad_id=1)
    b = epoch_batches(enc, 16, seed=3, epoch=4, pad_id=1)
    assert all(torch.equal(x["index"], y["index"]) for x, y in zip(a, b))
    resumed = a[100:]  # the training loop resumes by skipping the first k batches
    assert len(resumed) == len(a) - 100 and torch.equal(resumed[0]["input_ids"], a[100]["input_ids"])
    other = epoch_batches(enc, 16, seed=3, epoch=5, pad_id=1)
    assert not torch.equal(other[0]["index"], a[0]["index"])
    padded = sum(x["input_ids"].numel() for x in a)
    assert padded / enc.lengths.sum() < 1.05  # bucketing: little padding (random batches: ~1.5x)
    sizes = [len(x["index"]) for x in a]
    assert sizes.count(16) == len(a) - 1  # one short batch at most


def test_plain_random_batches_are_a_shuffle_cut_in_order():
    """group_by_length=False: transformers' Trainer's batches (a seeded permutation cut in order),
    every example once, more padding than grouped batches, resumable like them."""
    enc = make_encoded(np.random.default_rng(0).integers(3, 120, 5000))
    plain = epoch_batches(enc, 16, seed=3, epoch=4, pad_id=1, group_by_length=False)
    order = np.concatenate([x["index"].numpy() for x in plain])
    assert order.tolist() == np.random.default_rng([3, 4]).permutation(5000).tolist()
    grouped = epoch_batches(enc, 16, seed=3, epoch=4, pad_id=1)
    assert len(plain) == len(grouped) and torch.equal(plain[100:][0]["index"], plain[100]["index"])
    padded = {name: sum(x["input_ids"].numel() for x in b) for name, b in (("plain", plain), ("grouped", grouped))}
    assert padded["plain"] > 1.3 * padded["grouped"]


def test_epoch_batches_eval_order():
    enc = make_encoded([5, 2, 9, 3, 7])
    plain = epoch_batches(enc, 2, seed=0, epoch=0, shuffle=False, pad_id=0)
    assert [x["index"].tolist() for x in plain] == [[0, 1], [2, 3], [4]]
    by_length = epoch_batches(enc, 2, seed=0, epoch=0, shuffle=False, pad_id=0, sort_by_length=True)
    assert [x["index"].tolist() for x in by_length] == [[1, 3], [0, 4], [2]]


# ---------------------------------------------------------------------------------------------
# Demo task


def test_demo_task_shape(demo, tokenizer, demo_cache):
    assert demo.name == "demo" and demo.source == "demo" and len(demo.labels) == 8
    assert demo.languages == ("alpha", "beta", "delta", "epsilon", "gamma", "zeta")
    assert demo.unseen == {"epsilon", "zeta"} and demo.english == "alpha"
    for split, n in (("train", 400), ("dev", 100), ("test", 100)):
        assert demo.splits[split].counts() == {lang: n for lang in demo.languages}
        for lang in demo.languages:  # balanced labels in every language
            labels = demo.splits[split].labels[np.asarray(demo.splits[split].langs) == lang]
            per_label = np.bincount(labels, minlength=8)
            assert per_label.sum() == n and per_label.max() - per_label.min() <= 1
    assert select_languages(demo.splits["train"], "seen", demo).counts() == {l: 400 for l in ("alpha", "beta", "delta", "gamma")}
    assert [tokenizer._tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert 900 <= tokenizer.vocab_size <= 2000
    enc = encode_split(demo.splits["train"], tokenizer, 64, cache_dir=False)
    assert 8 <= enc.lengths.mean() <= 20 and enc.lengths.max() < 64
    assert (enc.tokens != 3).all()  # no <unk> on its own training text
    assert load_task("demo", cache_dir=demo_cache).splits["dev"].texts == demo.splits["dev"].texts


def test_demo_labels_need_more_than_one_word(demo):
    """No single word decides the label: a word seen 20+ times never has over 60% of one label
    (a topic noun splits between two acts and also appears as a distractor; a verb spans topics)."""
    train = demo.splits["train"]
    per_word: dict[str, np.ndarray] = {}
    for text, label in zip(train.texts, train.labels):
        for word in text.split():
            per_word.setdefault(word, np.zeros(8, np.int64))[label] += 1
    frequent = {w: c for w, c in per_word.items() if c.sum() >= 20}
    assert len(frequent) > 100
    assert max(c.max() / c.sum() for c in frequent.values()) <= 0.6


def test_demo_deterministic_fast_and_rebuilt_when_corrupt(demo, demo_cache, tmp_path):
    folder = demo_cache / "demo" / f"v{DEMO_VERSION}"
    start = time.perf_counter()
    build_demo(tmp_path)
    assert time.perf_counter() - start < 5.0
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "tokenizer.json", "manifest.json"):
        assert (tmp_path / "demo" / f"v{DEMO_VERSION}" / name).read_bytes() == (folder / name).read_bytes()
    # The same bytes from a fresh interpreter with another hash seed.
    code = ("import hashlib, json; from xlmr_mini.data.demo import generate_demo, train_tokenizer; rows = generate_demo(); "
            "print(hashlib.sha256(json.dumps(rows).encode()).hexdigest(), "
            "hashlib.sha256(train_tokenizer([r['text'] for r in rows['train']]).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1
    import hashlib
    tokenizer_digest = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    assert digests == {f"{hashlib.sha256(json.dumps(generate_demo()).encode()).hexdigest()} {tokenizer_digest}\n"}
    # A damaged cache entry is regenerated, not trusted.
    (tmp_path / "demo" / f"v{DEMO_VERSION}" / "tokenizer.json").write_text("{}")
    (tmp_path / "demo" / f"v{DEMO_VERSION}" / "dev.jsonl").write_text("")
    rebuilt = build_demo(tmp_path)
    assert rebuilt.splits["dev"].texts == demo.splits["dev"].texts
    assert Tokenizer(rebuilt.tokenizer_path).vocab_size == Tokenizer(demo.tokenizer_path).vocab_size
