"""A thin wrapper over `tokenizers.Tokenizer`: `<s> ... </s>`, truncation, dynamic padding.

Whitespace is handled as the original SentencePiece model does (text split on whitespace, so
leading, trailing and repeated spaces never become pieces), which is what transformers'
`XLMRobertaTokenizer` builds from a tokenizer.json: it keeps the vocabulary and the Precompiled
normalizer and replaces the rest with WhitespaceSplit + Metaspace. XLM-R's published
tokenizer.json instead runs Metaspace alone, which turns a trailing space into a `▁` piece
(2,970 of the 17,304 tweet_sentiment_multilingual texts segment differently).
`transformers_pipeline` rewrites a Unigram tokenizer.json to transformers' pipeline; every
tokenizer loaded here and every tokenizer.json saved with a model goes through it, so
`tokenizers`, `transformers` and training agree token for token. (transformers also fixes
Unigram's unknown-piece id at 3, as XLM-R's, the demo's and every trimmed tokenizer have it.)
"""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer

from xlmr_mini.errors import InputError
from xlmr_mini.files import atomic_write

METASPACE = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
SPECIAL_TOKENS = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
                  "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}


def transformers_pipeline(tokenizer: dict) -> dict:
    """A tokenizer.json dict (Unigram; others unchanged) as transformers' XLMRobertaTokenizer runs
    it: the first Precompiled normalizer only, WhitespaceSplit + Metaspace(always), `<s> A </s>`."""
    model = tokenizer.get("model", {})
    if model.get("type") != "Unigram":
        return tokenizer
    normalizer = tokenizer.get("normalizer") or {}
    normalizers = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    pieces = {piece: i for i, (piece, _) in enumerate(model["vocab"])}
    special = {t: {"id": t, "ids": [pieces[t]], "tokens": [t]} for t in ("<s>", "</s>") if t in pieces}
    template = {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}
    a, b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}
    return {
        **tokenizer,
        "normalizer": next((n for n in normalizers if n.get("type") == "Precompiled" and "precompiled_charsmap" in n), None),
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, METASPACE]},
        "decoder": METASPACE,
        "post_processor": None if len(special) < 2 else {
            "type": "TemplateProcessing", "single": [template[0], a, template[1]],
            "pair": [template[0], a, template[1], template[1], b, template[1]], "special_tokens": special},
    }


def read_tokenizer_json(path: Path) -> dict:
    """A tokenizer.json file as a dict, in transformers' pipeline (see `transformers_pipeline`)."""
    try:
        return transformers_pipeline(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def save_tokenizer(directory: Path, tokenizer: str | Path | dict, model_max_length: int) -> None:
    """tokenizer.json (from a file or a dict, in transformers' pipeline) and the tokenizer_config.json
    that `AutoTokenizer` and `pipeline` read: `model_max_length` and the special tokens."""
    tok = transformers_pipeline(tokenizer if isinstance(tokenizer, dict) else read_tokenizer_json(Path(tokenizer)))
    model = tok.get("model", {})
    # A Unigram vocabulary is a list of (piece, score); BPE's and WordPiece's a dict.
    present = {t["content"] for t in tok.get("added_tokens", [])} | {
        entry[0] if isinstance(entry, list) else entry for entry in model.get("vocab", [])}
    # transformers rebuilds a Unigram tokenizer as XLM-R's; it loads any other tokenizer.json as it is.
    tokenizer_class = "XLMRobertaTokenizer" if model.get("type") == "Unigram" else "PreTrainedTokenizerFast"
    config = {"tokenizer_class": tokenizer_class, "add_prefix_space": True, "model_max_length": model_max_length,
              **{name: token for name, token in SPECIAL_TOKENS.items() if token in present}}
    atomic_write(directory / "tokenizer.json", json.dumps(tok, ensure_ascii=False))
    atomic_write(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


class Tokenizer:
    """Encodes text the way XLM-R's tokenizer does for single sentences: `<s> pieces </s>`.

    Special tokens are looked up by their strings, so any tokenizer.json with `<s>`, `</s>` and
    `<pad>` works (XLM-R's own: 0, 2, 1). The tokenizer.json's own post-processor is not used.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"{path}: tokenizer.json not found")
        tokenizer = read_tokenizer_json(path)
        try:
            self._tok = _HFTokenizer.from_str(json.dumps(tokenizer))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise InputError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        self.path = path
        ids = {t: self._tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise InputError(f"{path}: special tokens {missing} are not in the vocabulary")
        self.bos_id, self.eos_id, self.pad_id = ids["<s>"], ids["</s>"], ids["<pad>"]
        self.unk_id = self._tok.token_to_id("<unk>")  # None when the tokenizer has none
        self.mask_id = self._tok.token_to_id("<mask>")
        self._tok.no_padding()
        self._tok.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_ids(self, texts: list[str], max_length: int = 128) -> list[list[int]]:
        """Token ids per text, with `<s>`/`</s>`, truncated to `max_length` in all."""
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3, got {max_length}")
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [[self.bos_id, *e.ids[: max_length - 2], self.eos_id] for e in encodings]

    def pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to the longest in the batch: (input_ids, attention_mask), both int64 [B, T]."""
        longest = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention_mask[row, : len(x)] = 1
        return input_ids, attention_mask

    def __call__(self, texts: list[str], max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pad(self.encode_ids(texts, max_length))
