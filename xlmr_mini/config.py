"""XLM-R architecture config: a frozen dataclass of sizes, read from and written to HF config.json."""
import dataclasses
import json
import math
from pathlib import Path

from xlmr_mini.errors import InputError

XLMR_MODEL_TYPES = ("xlm-roberta", "roberta")


@dataclasses.dataclass(frozen=True)
class XLMRConfig:
    vocab_size: int = 250002
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    initializer_range: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    id2label: tuple[str, ...] = ("LABEL_0", "LABEL_1")

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise InputError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "XLMRConfig":
        """The config a config.json dict describes, each used key checked for its type and range."""
        if not isinstance(d, dict):
            got = "null" if d is None else type(d).__name__
            raise InputError(f"{source}: expected a JSON object of model settings, got {got}")
        if d.get("model_type") not in XLMR_MODEL_TYPES:
            raise InputError(f"{source}: model_type {d.get('model_type')!r} is not XLM-R ('xlm-roberta')")
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise InputError(f"{source}: hidden_act {act!r} is not supported (XLM-R uses 'gelu')")
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise InputError(f"{source}: position_embedding_type {pos!r} is not supported (only 'absolute')")
        fields = {f.name for f in dataclasses.fields(cls)} - {"id2label"}
        values = {k: v for k, v in d.items() if k in fields and (v is not None or k == "classifier_dropout")}
        for key, value in values.items():
            _check_value(key, value, source)
        id2label = _id2label(d, source)
        try:
            cfg = cls(id2label=id2label, **values)
        except InputError as e:
            raise InputError(f"{source}: {e}") from None
        if not cfg.pad_token_id + 1 < cfg.max_position_embeddings:
            raise InputError(f"{source}: max_position_embeddings {cfg.max_position_embeddings} leaves no position "
                             f"after pad_token_id {cfg.pad_token_id} (positions start at pad_token_id + 1)")
        return cfg

    @classmethod
    def from_hf(cls, path: str | Path) -> "XLMRConfig":
        """Read `config.json` (or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise InputError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["id2label"] = {str(i): name for i, name in enumerate(self.id2label)}
        d["label2id"] = {name: i for i, name in enumerate(self.id2label)}
        d.update(
            architectures=["XLMRobertaForSequenceClassification"],
            model_type="xlm-roberta",
            hidden_act="gelu",
            position_embedding_type="absolute",
            problem_type="single_label_classification",
        )
        return d

    def replace(self, **changes) -> "XLMRConfig":
        return dataclasses.replace(self, **changes)

    @property
    def max_tokens(self) -> int:
        """The longest input, <s> and </s> included, that the position table holds."""
        return self.max_position_embeddings - self.pad_token_id - 1


def check_max_length(max_length: int, cfg: XLMRConfig | None = None) -> None:
    """`--max-length` holds <s>, a piece and </s>, and (given the model's config) fits its positions."""
    if max_length < 3:
        raise InputError(f"--max-length {max_length}: must be at least 3 (<s>, one piece, </s>)")
    if cfg is not None and max_length > cfg.max_tokens:
        raise InputError(f"--max-length {max_length}: the model has positions for at most {cfg.max_tokens} tokens")


# What config.json's keys must hold: sizes are positive integers, token ids non-negative integers,
# dropouts probabilities (classifier_dropout may be null), the rest (epsilon, init range) positive.
_COUNTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
           "max_position_embeddings", "type_vocab_size")
_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")


def _check_value(key: str, value, source: str) -> None:
    if key in _COUNTS:
        wanted, ok = "a positive integer", type(value) is int and value >= 1
    elif key in _IDS:
        wanted, ok = "a non-negative integer", type(value) is int and value >= 0
    elif key in _PROBABILITIES:
        wanted, ok = "a number in [0, 1)", value is None or (_is_number(value) and 0 <= value < 1)
    else:  # layer_norm_eps, initializer_range
        wanted, ok = "a positive number", _is_number(value) and value > 0
    if not ok:
        raise InputError(f"{source}: {key} is {json.dumps(value, default=str)}; expected {wanted}")


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _id2label(d: dict, source: str) -> tuple[str, ...]:
    """Label names in id order from `id2label` (keys 0..n-1, as JSON strings or ints), else
    `num_labels` generic names."""
    if "id2label" not in d:
        n = d.get("num_labels", 2)
        if type(n) is not int or n < 1:
            raise InputError(f"{source}: num_labels is {json.dumps(n)}; expected a positive integer")
        return tuple(f"LABEL_{i}" for i in range(n))
    id2label = d["id2label"]
    if not isinstance(id2label, dict) or not id2label:
        raise InputError(f'{source}: id2label must be an object of label names by id ({{"0": "name", ...}})')
    names = {str(k): v for k, v in id2label.items()}
    missing = [i for i in range(len(names)) if str(i) not in names]
    if missing:
        raise InputError(f"{source}: id2label has no label for id {missing[0]} (ids must run from 0 to "
                         f"{len(names) - 1}; it has {', '.join(sorted(names, key=_id_order))})")
    bad = next((v for v in names.values() if not isinstance(v, str)), None)
    if bad is not None:
        raise InputError(f"{source}: id2label holds {json.dumps(bad)}; expected label names (strings)")
    return tuple(names[str(i)] for i in range(len(names)))


def _id_order(key: str):
    return (0, int(key)) if key.isdigit() else (1, key)
