"""Hugging Face checkpoint directories in and out: config.json + safetensors, HF key names.

State dicts outside the model use the canonical keys of transformers'
`XLMRobertaForSequenceClassification` (`roberta.embeddings...`, `roberta.encoder.layer.N...`,
`classifier...`). `HF_TO_NATIVE` maps them to the native module's names; it is the only
translation, used in both directions.
"""
import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from xlmr_mini.config import XLMRConfig
from xlmr_mini.errors import InputError
from xlmr_mini.files import atomic_write
from xlmr_mini.model import XLMRClassifier, init_weights
from xlmr_mini.tokenizer import save_tokenizer

log = logging.getLogger(__name__)

_LAYER = {
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp.up",
    "output.dense": "mlp.down",
    "output.LayerNorm": "mlp_norm",
}
_OTHER = {
    "roberta.embeddings.word_embeddings": "embed.word",
    "roberta.embeddings.position_embeddings": "embed.position",
    "roberta.embeddings.token_type_embeddings": "embed.token_type",
    "roberta.embeddings.LayerNorm": "embed.norm",
    "classifier.dense": "head.dense",
    "classifier.out_proj": "head.out_proj",
}
# HF name -> native name; "{}" is the layer index.
HF_TO_NATIVE = {
    **{f"roberta.encoder.layer.{{}}.{hf}.{p}": f"layers.{{}}.{nat}.{p}" for hf, nat in _LAYER.items() for p in ("weight", "bias")},
    **{f"{hf}.{p}": f"{nat}.{p}" for hf, nat in _OTHER.items() for p in ("weight", "bias")},
}
del HF_TO_NATIVE["roberta.embeddings.word_embeddings.bias"]
del HF_TO_NATIVE["roberta.embeddings.position_embeddings.bias"]
del HF_TO_NATIVE["roberta.embeddings.token_type_embeddings.bias"]
NATIVE_TO_HF = {v: k for k, v in HF_TO_NATIVE.items()}

# Keys of other XLM-R heads that a classifier does not use: dropped with a note.
IGNORABLE = re.compile(r"^(lm_head\.|roberta\.pooler\.|roberta\.embeddings\.(position_ids|token_type_ids)$)")
CLASSIFIER_PREFIX = "classifier."


def _convert(key: str, table: dict[str, str]) -> str | None:
    m = re.search(r"\.(\d+)\.", key)
    template = key if m is None else key[: m.start()] + ".{}." + key[m.end():]
    target = table.get(template)
    if target is None:
        return None
    return target if m is None else target.format(m.group(1))


def hf_to_native(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_convert(k, HF_TO_NATIVE): v for k, v in state_dict.items()}


def native_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_convert(k, NATIVE_TO_HF): v for k, v in state_dict.items()}


def canonical_key(key: str) -> str:
    """`embeddings.x` / `encoder.x` / `pooler.x` (XLMRobertaModel) gain the `roberta.` prefix."""
    if key.split(".", 1)[0] in ("embeddings", "encoder", "pooler"):
        return "roberta." + key
    return key


def expected_shapes(cfg: XLMRConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = XLMRClassifier(cfg)
    return {k: tuple(v.shape) for k, v in native_to_hf(model.state_dict()).items()}


def checked_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                    source: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Canonical keys, each known, of the shape the config implies and finite; other models' heads
    (LM head, pooler) are dropped and their names returned. Unknown keys, wrong shapes and NaN or
    infinite weights raise."""
    kept, ignored = {}, set()
    for key, tensor in tensors.items():
        key = canonical_key(key)
        if IGNORABLE.match(key):
            ignored.add(key.split(".")[0] if key.startswith("lm_head") else ".".join(key.split(".")[:2]))
        elif key not in shapes:
            raise InputError(f"{source}: unexpected tensor {key!r} (not part of an XLM-R classifier)")
        elif tuple(tensor.shape) != shapes[key]:
            raise InputError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, config.json implies {shapes[key]}")
        elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise InputError(f"{source}: tensor {key!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                             f"the model is damaged (saved from a diverged run?)")
        else:
            kept[key] = tensor
    return kept, ignored


def weight_files(path: Path) -> list[Path]:
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise InputError(f"{index}: shard {f.name} is missing")
        return files
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    raise InputError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".bin":
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise InputError(f"{file}: cannot be read as a weights-only PyTorch file ({str(e).splitlines()[0]})") from None
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{file}: not a valid safetensors file ({e})") from None


def read_hf_state_dict(path: str | Path, init_missing_classifier: bool = True) -> tuple[XLMRConfig, dict[str, torch.Tensor]]:
    """Read an HF XLM-R directory into (config, canonical HF state dict), checked key by key.

    Accepts XLMRobertaModel, ...ForSequenceClassification and ...ForMaskedLM checkpoints; the LM
    head and pooler are dropped with a note. A missing classifier is initialized as transformers
    would (normal(0, initializer_range), zero bias) when `init_missing_classifier`, else left out.
    """
    path = Path(path)
    cfg = XLMRConfig.from_hf(path)
    shapes = expected_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    ignored: set[str] = set()
    for file in weight_files(path):
        tensors, dropped = checked_tensors(_read_tensors(file), shapes, source=str(file))
        state.update(tensors)
        ignored |= dropped
    if ignored:
        log.info("%s: ignoring %s (not used by a sequence classifier)", path, ", ".join(sorted(ignored)))
    missing = [k for k in shapes if k not in state]
    missing_body = [k for k in missing if not k.startswith(CLASSIFIER_PREFIX)]
    if missing_body:
        raise InputError(f"{path}: tensor {missing_body[0]!r} is missing" + (f" (and {len(missing_body) - 1} more)" if len(missing_body) > 1 else ""))
    if missing and init_missing_classifier:
        log.warning("%s: no classifier in the checkpoint; initializing a fresh %d-label head", path, cfg.num_labels)
        state.update(fresh_classifier(cfg, dtype=state["roberta.embeddings.word_embeddings.weight"].dtype))
    return cfg, state


def fresh_classifier(cfg: XLMRConfig, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A classification head initialized as transformers does, in HF key names."""
    from xlmr_mini.model import ClassificationHead

    head = ClassificationHead(cfg)
    init_weights(head, cfg.initializer_range)
    return {f"classifier.{k}": v.to(dtype) for k, v in head.state_dict().items()}


def build_model(cfg: XLMRConfig, hf_state_dict: dict[str, torch.Tensor], device=None, dtype=None) -> XLMRClassifier:
    """The native model holding exactly these tensors (strict; no copy when device/dtype match)."""
    with torch.device("meta"):
        model = XLMRClassifier(cfg)
    native = {k: v.to(device=device, dtype=dtype) for k, v in hf_to_native(hf_state_dict).items()}
    model.load_state_dict(native, strict=True, assign=True)
    return model


def load_model(path: str | Path, device=None, dtype=None) -> XLMRClassifier:
    """Load an HF XLM-R checkpoint directory into the native model."""
    cfg, state = read_hf_state_dict(path)
    return build_model(cfg, state, device=device, dtype=dtype)


def hf_state_dict(model: XLMRClassifier) -> dict[str, torch.Tensor]:
    return native_to_hf(model.state_dict())


def save_hf(path: str | Path, cfg: XLMRConfig, hf_state: dict[str, torch.Tensor],
            tokenizer_file: str | Path | dict | None = None) -> Path:
    """Write an HF directory (config.json, model.safetensors; with a tokenizer, a file or a
    tokenizer.json dict, also tokenizer.json and tokenizer_config.json, see `save_tokenizer`).

    Each file is written to a temporary name in the directory and renamed into place, so a crash
    leaves either the old file or the new one. Loadable by transformers'
    `AutoModelForSequenceClassification.from_pretrained` with no missing or unexpected keys, and
    by `AutoTokenizer` with `model_max_length` = the model's positions (less XLM-R's offset of 2).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in hf_state.items()}
    config = cfg.to_hf_dict()
    config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / "config.json", json.dumps(config, indent=2) + "\n")
    if tokenizer_file is not None:
        save_tokenizer(path, tokenizer_file, cfg.max_tokens)
    return path


def save_model(path: str | Path, model: XLMRClassifier, tokenizer_file: str | Path | None = None) -> Path:
    return save_hf(path, model.cfg, hf_state_dict(model), tokenizer_file)


def check_model_dir(path: str | Path, flag: str) -> Path:
    """`path` as a model directory given by `flag`, or one line saying why it is not one."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{flag} {path}: no such directory")
    if not path.is_dir():
        raise InputError(f"{flag} {path}: not a directory (give the model's directory, which holds config.json "
                         f"and the weights)")
    return path


def check_tokenizer(tokenizer_size: int, tokenizer_file: str | Path, cfg: XLMRConfig, model: str) -> None:
    """A model reads the ids of its own tokenizer: one word-embedding row per piece."""
    if tokenizer_size != cfg.vocab_size:
        raise InputError(f"{tokenizer_file}: {tokenizer_size} pieces, but {model} has {cfg.vocab_size} "
                         f"word-embedding rows; a model needs its own tokenizer")


def find_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer.json saved beside a checkpoint, if any."""
    candidate = Path(path) / "tokenizer.json"
    return candidate if candidate.is_file() else None
