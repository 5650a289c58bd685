"""The readers, partitions and subsets on the real MASSIVE and tweet_sentiment_multilingual files."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, TSM, XLMR_TOKENIZER

from xlmr_mini.data import (
    TSM_LABELS, UNSEEN, encode_split, epoch_batches, load_task, select_languages, stratified_subset,
)
from xlmr_mini.errors import InputError

MASSIVE = SHARED / "data" / "massive" / "1.1" / "data"


def _need(path: Path):
    """Skip (in the fixture, so only the tests that use this data) when it is absent."""
    if not path.exists():
        pytest.skip(f"real data folder {path} is not present")


@pytest.fixture(scope="module")
def massive():
    _need(MASSIVE)
    return load_task(f"massive:{MASSIVE}")


@pytest.fixture(scope="module")
def tsm():
    _need(TSM)
    return load_task(f"tsm:{TSM}")


def test_massive_counts_and_labels(massive):
    assert massive.name == "massive" and massive.english == "en-US"
    assert set(massive.splits) == {"train", "dev"}
    locales = ["ar-SA", "de-DE", "en-US", "ja-JP", "sw-KE", "th-TH"]
    assert massive.splits["train"].counts() == {loc: 11514 for loc in locales}
    assert massive.splits["dev"].counts() == {loc: 2033 for loc in locales}
    assert len(massive.labels) == 60 and list(massive.labels) == sorted(massive.labels)
    assert "alarm_set" in massive.labels and "iot_hue_lightchange" in massive.labels
    assert massive.notes == ()
    train = massive.splits["train"]
    assert train.labels.dtype == np.int64
    first = train.texts.index("wake me up at nine am on friday")
    assert massive.labels[train.labels[first]] == "alarm_set" and train.langs[first] == "en-US"
    # MASSIVE is parallel: every locale has the same label histogram in train.
    hist = {loc: np.bincount(train.labels[np.asarray(train.langs) == loc], minlength=60) for loc in locales}
    assert all((h == hist["en-US"]).all() for h in hist.values())


def test_tsm_counts_and_labels(tsm):
    languages = sorted("arabic english french german hindi italian portuguese spanish".split())
    assert tsm.labels == TSM_LABELS == ("negative", "neutral", "positive")
    assert set(tsm.splits) == {"train", "dev"}  # the published "val" is our "dev"
    assert tsm.splits["train"].counts() == {lang: 1839 for lang in languages}
    assert tsm.splits["dev"].counts() == {lang: 324 for lang in languages}
    assert set(np.unique(tsm.splits["train"].labels)) == {0, 1, 2}
    # Literal "\u2019" escapes are kept as published, not decoded.
    english = select_languages(tsm.splits["train"], "english", tsm)
    assert english.texts[0].startswith("okay i\\u2019m sorry but TAYLOR SWIFT") and english.labels[:3].tolist() == [0, 1, 2]


def test_partitions(massive, tsm):
    assert len(UNSEEN["massive"]) == 27 and {"sw-KE", "th-TH", "fa-IR", "sl-SL"} <= UNSEEN["massive"]
    assert UNSEEN["tsm"] == {"arabic", "french", "hindi", "portuguese"}
    assert massive.seen == {"ar-SA", "de-DE", "en-US", "ja-JP"}
    assert tsm.seen == {"english", "german", "italian", "spanish"}
    seen = select_languages(massive.splits["train"], "seen", massive)
    assert seen.counts() == {loc: 11514 for loc in ["ar-SA", "de-DE", "en-US", "ja-JP"]}
    assert set(select_languages(tsm.splits["dev"], "unseen", tsm).langs) == UNSEEN["tsm"]
    assert select_languages(massive.splits["dev"], "english", massive).counts() == {"en-US": 2033}
    assert select_languages(tsm.splits["train"], ["german", "hindi"], tsm).counts() == {"german": 1839, "hindi": 1839}
    assert len(select_languages(tsm.splits["train"], "all", tsm)) == 8 * 1839
    with pytest.raises(InputError, match="unknown language.*xx-YY"):
        select_languages(massive.splits["train"], "en-US,xx-YY", massive)


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.2])
def test_massive_subset_proportions(massive, fraction):
    train = massive.splits["train"]
    subset = stratified_subset(train, fraction, seed=3)
    langs, sub_langs = np.asarray(train.langs), np.asarray(subset.langs)
    for loc in massive.languages:
        full = np.bincount(train.labels[langs == loc], minlength=60)
        part = np.bincount(subset.labels[sub_langs == loc], minlength=60)
        assert part.sum() == round(fraction * 11514)
        assert ((part >= 1) == (full >= 1)).all()  # no class that has examples is dropped
        assert np.abs(part - fraction * full).max() < 1.0  # per-label proportions kept to within one example
    again = stratified_subset(train, fraction, seed=3)
    assert again.texts == subset.texts and stratified_subset(train, fraction, seed=4).texts != subset.texts


def test_tsm_tokens_and_batches(tsm, tmp_path):
    _need(XLMR_TOKENIZER)
    from xlmr_mini.tokenizer import Tokenizer

    tokenizer = Tokenizer(XLMR_TOKENIZER)
    train = select_languages(tsm.splits["train"], "english", tsm)
    enc = encode_split(train, tokenizer, 128, cache_dir=tmp_path)
    assert 20 < enc.lengths.mean() < 35 and np.percentile(enc.lengths, 99) < 80  # tweets: ~27 tokens
    batches = epoch_batches(enc, 32, seed=0, epoch=0, pad_id=tokenizer.pad_id)
    padded = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert real == enc.lengths.sum() and padded / real < 1.15  # vs ~4.7x when padding to 128


def test_cli_real(tmp_path):
    _need(TSM)
    out = subprocess.run([sys.executable, "-m", "xlmr_mini.data", f"tsm:{TSM}", "--langs", "seen"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tsm from" in out.stdout and "3 labels, 8 languages" in out.stdout
    assert re.search(r"train +7356 examples, 3 labels present: english=1839  german=1839", out.stdout)
    bad = subprocess.run([sys.executable, "-m", "xlmr_mini.data", f"tsm:{TSM}", "--langs", "english,klingon"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown language(s) klingon" in bad.stderr and bad.stderr.count("\n") == 1
