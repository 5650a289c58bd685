"""A thin wrapper over `tokenizers.Tokenizer`: `<s> ... </s>`, truncation, dynamic padding."""
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer

from xlmr_mini.errors import InputError


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
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise InputError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        self.path = path
        ids = {t: self._tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise InputError(f"{path}: special tokens {missing} are not in the vocabulary")
        self.bos_id, self.eos_id, self.pad_id = ids["<s>"], ids["</s>"], ids["<pad>"]
        self.unk_id = self._tok.token_to_id("<unk>")  # None when the tokenizer has none
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
