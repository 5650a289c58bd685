"""The tokenizer wrapper on XLM-R's real tokenizer.json."""
import pytest
from conftest import SHARED, requires_shared

from xlmr_mini.errors import InputError
from xlmr_mini.tokenizer import Tokenizer

XLMR_TOKENIZER = SHARED / "tokenizers" / "xlm-roberta" / "tokenizer.json"


@requires_shared("tokenizers", "xlm-roberta", "tokenizer.json")
def test_real_xlmr_tokenizer_ids():
    tok = Tokenizer(XLMR_TOKENIZER)
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 250002)
    assert tok.encode_ids(["Hello, my dog is cute"]) == [[0, 35378, 4, 759, 10269, 83, 99942, 2]]


@requires_shared("tokenizers", "xlm-roberta", "tokenizer.json")
def test_truncation_and_dynamic_padding():
    tok = Tokenizer(XLMR_TOKENIZER)
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
