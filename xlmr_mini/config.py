"""XLM-R architecture config: a frozen dataclass of sizes, read from and written to HF config.json."""
import dataclasses
import json
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
        if d.get("model_type") not in XLMR_MODEL_TYPES:
            raise InputError(f"{source}: model_type {d.get('model_type')!r} is not XLM-R ('xlm-roberta')")
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise InputError(f"{source}: hidden_act {act!r} is not supported (XLM-R uses 'gelu')")
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise InputError(f"{source}: position_embedding_type {pos!r} is not supported (only 'absolute')")
        if "id2label" in d:
            id2label = d["id2label"]
            id2label = tuple(id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label)))
        else:
            id2label = tuple(f"LABEL_{i}" for i in range(d.get("num_labels", 2)))
        fields = {f.name for f in dataclasses.fields(cls)} - {"id2label"}
        return cls(id2label=id2label, **{k: v for k, v in d.items() if k in fields and (v is not None or k == "classifier_dropout")})

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
