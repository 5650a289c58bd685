"""The built-in demo task: a synthetic multilingual intent task that the package generates itself.

Six invented languages share eight labels. A label is a (topic, act) pair: a sentence names a
topic with one of ten nouns and an act with one of five verbs, so no single word decides it, and
half the sentences also mention a noun of another topic behind a marker word ("... near the X"),
which a bag of words cannot tell from the real topic. The languages come in two families
that derive their words from shared roots by sound changes (cognates), with different word orders
and affixes, and all share some loanwords, names and numbers. `epsilon` (a relative of
alpha/beta/gamma) and `zeta` (a relative of delta) are held out as unseen, so zero-shot transfer
is possible through cognates and loanwords but not trivial.

Everything comes from a seeded generator that only uses `random.Random.random()` (the one method
whose sequence Python guarantees across versions), so the bytes are the same on every run. A Unigram
tokenizer like XLM-R's, with its special-token ids (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last), is
trained on the train text. Both are cached under `{cache}/demo/v{DEMO_VERSION}/`, checked against a
manifest of hashes.
"""
import collections
import dataclasses
import hashlib
import json
import math
import random
from pathlib import Path

from xlmr_mini.data.batching import default_cache_dir
from xlmr_mini.files import atomic_write
from xlmr_mini.data.task import TaskData
from xlmr_mini.tokenizer import transformers_pipeline

DEMO_VERSION = 2  # 2: a Unigram tokenizer (was BPE)
SEED = 20240611
LANGUAGES = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")
UNSEEN_LANGUAGES = frozenset({"epsilon", "zeta"})
SIZES = {"train": 400, "dev": 100, "test": 100}  # examples per language
TOPICS = ("food", "music", "travel", "weather")
ACTS = ("query", "request")
LABELS = tuple(sorted(f"{t}_{a}" for t in TOPICS for a in ACTS))
NOUNS_PER_TOPIC, LOAN_NOUNS_PER_TOPIC = 10, 3
VERBS_PER_ACT, LOAN_VERBS_PER_ACT = 5, 1
N_ADJECTIVES, N_FILLERS, N_NAMES = 40, 25, 150
VOCAB_SIZE = 1000  # small enough that rarer words split into pieces that cognates share
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..3 and <mask> last, as in XLM-R

# Two families, each with its own sound inventory; a language = family roots + its sound changes.
FAMILIES = {
    "north": {"consonants": "ptkmnlrsv", "vowels": "aeiou", "members": ("alpha", "beta", "gamma", "epsilon")},
    "south": {"consonants": "bdgzhjwyf", "vowels": "aiouy", "members": ("delta", "zeta")},
}
GRAMMAR = {  # sound changes (applied in order), noun suffixes (sg, pl), verb affix, word order
    "alpha": {"changes": {}, "noun": ("", "s"), "verb": ("", ""), "verb_final": False},
    "beta": {"changes": {"k": "g", "o": "u"}, "noun": ("a", "an"), "verb": ("", "er"), "verb_final": False},
    "gamma": {"changes": {"t": "d", "e": "i", "s": "z"}, "noun": ("", "ki"), "verb": ("u", ""), "verb_final": True},
    "epsilon": {"changes": {"p": "b"}, "noun": ("", "en"), "verb": ("", ""), "verb_final": True},
    "delta": {"changes": {}, "noun": ("", "im"), "verb": ("y", ""), "verb_final": True},
    "zeta": {"changes": {"w": "v"}, "noun": ("", "u"), "verb": ("", ""), "verb_final": False},
}


class _Rng:
    """Seeded choices built on `random()` alone, so the sequence is stable across Python versions."""

    def __init__(self, seed: int):
        self._random = random.Random(seed)

    def below(self, n: int) -> int:
        return min(int(self._random.random() * n), n - 1)

    def chance(self, p: float) -> bool:
        return self._random.random() < p

    def pick(self, items):
        return items[self.below(len(items))]


def _word(rng: _Rng, consonants: str, vowels: str, syllables: int) -> str:
    return "".join(rng.pick(consonants) + rng.pick(vowels) + ("n" if rng.chance(0.15) else "") for _ in range(syllables))


def _lexicons(rng: _Rng) -> tuple[dict[str, dict], dict]:
    """Per-language word lists, and the items shared by every language (loans, names)."""
    concepts = {
        "noun": [(t, i) for t in TOPICS for i in range(NOUNS_PER_TOPIC)],
        "verb": [(a, i) for a in ACTS for i in range(VERBS_PER_ACT)],
        "adj": list(range(N_ADJECTIVES)),
        "filler": list(range(N_FILLERS)),
        "marker": [0],
    }
    loans = {
        "noun": {(t, i): _word(rng, "ptkbdgmnlrs", "aeiou", 3) for t in TOPICS for i in range(LOAN_NOUNS_PER_TOPIC)},
        "verb": {(a, i): _word(rng, "ptkbdgmnlrs", "aeiou", 2) + "ar" for a in ACTS for i in range(LOAN_VERBS_PER_ACT)},
    }
    names = [_word(rng, "ptkbdgmnlrsvz", "aeiou", 2 + rng.below(2)).capitalize() for _ in range(N_NAMES)]
    lexicons = {}
    for family in FAMILIES.values():
        syllables = {"noun": 2, "verb": 2, "adj": 2, "filler": 1, "marker": 1}
        roots = {kind: {c: _word(rng, family["consonants"], family["vowels"], syllables[kind] + rng.below(2))
                        for c in items} for kind, items in concepts.items()}
        for lang in family["members"]:
            g = GRAMMAR[lang]
            change = str.maketrans(g["changes"])
            words = {kind: {c: root.translate(change) for c, root in table.items()} for kind, table in roots.items()}
            for kind in ("noun", "verb"):
                words[kind].update(loans[kind])  # loans keep their form everywhere
            lexicons[lang] = words
    return lexicons, {"names": names}


def _sentence(rng: _Rng, lang: str, words: dict, shared: dict, label: str) -> str:
    g = GRAMMAR[lang]
    topic, act = label.split("_")
    noun = words["noun"][(topic, rng.below(NOUNS_PER_TOPIC))] + g["noun"][rng.below(2)]
    verb = g["verb"][0] + words["verb"][(act, rng.below(VERBS_PER_ACT))] + g["verb"][1]
    obj = [noun] if not rng.chance(0.5) else [words["adj"][rng.below(N_ADJECTIVES)], noun]
    core = [verb, *obj]
    if rng.chance(0.5):  # a distractor noun of another topic, behind the marker word
        other = rng.pick([t for t in TOPICS if t != topic])
        distractor = words["noun"][(other, rng.below(NOUNS_PER_TOPIC))] + g["noun"][0]
        marker = words["marker"][0]
        core += [marker, distractor] if not g["verb_final"] else [distractor, marker]
    if g["verb_final"]:
        core = core[1:] + core[:1]
    if rng.chance(0.6):  # a shared name or number, at either end
        item = rng.pick(shared["names"]) if rng.chance(0.6) else str(1 + rng.below(99))
        core = [item, *core] if rng.chance(0.5) else [*core, item]
    pre = [words["filler"][rng.below(N_FILLERS)] for _ in range(rng.below(3))]
    post = [words["filler"][rng.below(N_FILLERS)] for _ in range(rng.below(3))]
    return " ".join(pre + core + post)


def generate_demo(seed: int = SEED) -> dict[str, list[dict]]:
    """The demo's rows per split: {"train": [{"text", "label", "lang"}, ...], "dev": ..., "test": ...}."""
    rng = _Rng(seed)
    lexicons, shared = _lexicons(rng)
    rows = {split: [] for split in SIZES}
    for split, size in SIZES.items():
        for lang in LANGUAGES:
            for i in range(size):
                label = LABELS[i % len(LABELS)]  # balanced classes
                rows[split].append({"text": _sentence(rng, lang, lexicons[lang], shared, label), "label": label, "lang": lang})
        order = list(range(len(rows[split])))
        for i in range(len(order) - 1, 0, -1):  # Fisher-Yates on _Rng, not random.shuffle
            j = rng.below(i + 1)
            order[i], order[j] = order[j], order[i]
        rows[split] = [rows[split][i] for i in order]
    return rows


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> str:
    """A Unigram tokenizer.json like XLM-R's, with its special-token ids, in the pipeline that
    transformers' XLMRobertaTokenizer runs. The pieces come from a BPE training on `texts`, each
    scored by the log of its (add-one) frequency in the BPE segmentation of `texts`: `tokenizers`'
    own Unigram trainer gives scores that vary from run to run, and the demo's bytes must not."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS[:-1],
                                                       show_progress=False))
    counts = collections.Counter(i for e in bpe.encode_batch(texts, add_special_tokens=False) for i in e.ids)
    ids = bpe.get_vocab()
    total = sum(counts.values()) + len(ids)
    vocab = [(piece, 0.0 if piece in SPECIAL_TOKENS else math.log((counts[i] + 1) / total))
             for piece, i in sorted(ids.items(), key=lambda item: item[1])] + [("<mask>", 0.0)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return json.dumps(transformers_pipeline(json.loads(tokenizer.to_str())), ensure_ascii=False)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def _manifest_ok(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text("utf-8"))
        if manifest.get("version") != DEMO_VERSION:
            return False
        return all(hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
                   for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def write_demo(folder: Path) -> None:
    """Generate the demo into `folder`: {train,dev,test}.jsonl, tokenizer.json, manifest.json."""
    rows = generate_demo()
    files = {f"{split}.jsonl": _jsonl(r) for split, r in rows.items()}
    files["tokenizer.json"] = train_tokenizer([r["text"] for r in rows["train"]]).encode("utf-8")
    for name, data in files.items():
        atomic_write(folder / name, data)
    manifest = {"version": DEMO_VERSION, "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
    atomic_write(folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))


def build_demo(cache_dir=None) -> TaskData:
    """The demo task, generated on first use and cached (a cache that fails its manifest is rebuilt)."""
    from xlmr_mini.data.readers import read_files

    folder = Path(cache_dir or default_cache_dir()) / "demo" / f"v{DEMO_VERSION}"
    if not _manifest_ok(folder):
        write_demo(folder)
    task = read_files(folder)
    return dataclasses.replace(task, name="demo", unseen=UNSEEN_LANGUAGES, source="demo",
                               tokenizer_path=str(folder / "tokenizer.json"), english="alpha", notes=())
