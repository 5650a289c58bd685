"""Student initialization by weight copy on raw HF state dicts: from-teacher, from-base, from-scratch.

The paper's §2.2: a student is initialized by copying weights from a larger XLM-R, either the
fine-tuned teacher (with its classification head) or the pretrained base (the head is fresh), or
not at all (transformers-style random init). Everything here works on plain `dict[str, Tensor]`
state dicts in transformers' key names (see `checkpoint.py`) and returns new tensors: the input
is never aliased, so a student trained in place cannot corrupt its teacher.

Depth (paper eq. 5/6). Student layer i (1-based) takes teacher layer k = i * divisor, divisor =
teacher layers / student layers: 12 -> 6 copies teacher layers 2, 4, ..., 12 (1-based), i.e.
0-based 1, 3, ..., 11. An explicit map of 0-based teacher layers (DistilBERT's 0,2,4,7,9,11) is
accepted instead; it must be strictly increasing and one entry per student layer.

Width (Xu et al. 2024, "Initializing Models with Larger Ones"). Every dimension that shrinks
keeps evenly spaced elements: `select_evenly(n_big, n_small)` is `arange(n_small) * (n_big //
n_small)` when the sizes divide, else `round(linspace(0, n_big - 1, n_small))`. All indices are
0-based; the paper's example (a 4x4 weight to 2x2 keeps "the 1st and 3rd slices", 1-based) is
indices 0 and 2. Each tensor axis is one of four kinds (`_AXES`, the table below):

- hidden (the residual stream, D -> d): `hidden_indices(D, d)`, shared by every tensor that reads
  or writes the residual stream: embeddings (word, position, token type) along their hidden
  column, every LayerNorm, the input side of Q/K/V and the MLP up-projection, the output side of
  the attention output and MLP down-projection, the classifier's dense layer.
- attention (the Q/K/V output / attention-output input, split into heads): head-aware, see below.
- intermediate (the MLP, I -> i): `select_evenly(I, i)`.
- label (the classifier's rows): unchanged, or permuted when the student lists the same labels in
  another order.

Attention heads. By default the student keeps the teacher's head count and each head shrinks
(768/12 heads of 64 -> 384/12 heads of 32). The attention indices are chosen per head:
student head j takes `select_evenly(head_T, head_S)` inside teacher head j, so every student head
lies inside one teacher head. When the sizes divide this is exactly `select_evenly(D, d)` (what
the residual stream uses); when they do not, a global linspace would straddle head boundaries,
so the per-head rule is the one used. A smaller head count is an explicit choice
(`StudentSpec(heads=...)`, `--heads`): the student keeps teacher heads `head_indices(H, h)` =
`select_evenly(H, h)`, each narrowed to the student head size the same way. A student head
larger than a teacher head, or more heads than the teacher, is rejected (that would need merging
heads, not selecting). For attention-map distillation, student head j corresponds to teacher
head `head_indices(H, h)[j]`.

Narrowing is not function-preserving (LayerNorm statistics and attention scales change): a
narrowed student is a starting point for training. At full width with a layer subset the
student computes exactly the teacher's embedding, the chosen layers and the head, so it can be
evaluated zero-shot (paper Table 5) as is.

Command line: `python -m xlmr_mini.copy_weights --teacher DIR --layers 6 --hidden 384 --out DIR`
writes an HF directory (config.json, model.safetensors, tokenizer.json when the source has one)
that transformers' `AutoModelForSequenceClassification` loads with no missing/unexpected keys.
"""
import argparse
import dataclasses
import logging
import math
import re
from pathlib import Path

import torch

from xlmr_mini.checkpoint import (
    CLASSIFIER_PREFIX,
    checked_tensors,
    expected_shapes,
    find_tokenizer,
    fresh_classifier,
    hf_state_dict,
    read_hf_state_dict,
    save_hf,
)
from xlmr_mini.config import XLMRConfig
from xlmr_mini.errors import InputError, IntList, cli_main
from xlmr_mini.files import check_apart
from xlmr_mini.model import XLMRClassifier, init_weights

log = logging.getLogger(__name__)

INITS = ("from-teacher", "from-base", "from-scratch")

HID, ATT, MLP, LBL = "hidden", "attention", "intermediate", "label"
# HF key (layer index as "{}") -> the kind of each tensor axis; None = never resized.
_LAYER_AXES = {
    "attention.self.query.weight": (ATT, HID),
    "attention.self.query.bias": (ATT,),
    "attention.self.key.weight": (ATT, HID),
    "attention.self.key.bias": (ATT,),
    "attention.self.value.weight": (ATT, HID),
    "attention.self.value.bias": (ATT,),
    "attention.output.dense.weight": (HID, ATT),
    "attention.output.dense.bias": (HID,),
    "attention.output.LayerNorm.weight": (HID,),
    "attention.output.LayerNorm.bias": (HID,),
    "intermediate.dense.weight": (MLP, HID),
    "intermediate.dense.bias": (MLP,),
    "output.dense.weight": (HID, MLP),
    "output.dense.bias": (HID,),
    "output.LayerNorm.weight": (HID,),
    "output.LayerNorm.bias": (HID,),
}
_AXES = {
    "roberta.embeddings.word_embeddings.weight": (None, HID),
    "roberta.embeddings.position_embeddings.weight": (None, HID),
    "roberta.embeddings.token_type_embeddings.weight": (None, HID),
    "roberta.embeddings.LayerNorm.weight": (HID,),
    "roberta.embeddings.LayerNorm.bias": (HID,),
    **{f"roberta.encoder.layer.{{}}.{k}": v for k, v in _LAYER_AXES.items()},
    "classifier.dense.weight": (HID, HID),
    "classifier.dense.bias": (HID,),
    "classifier.out_proj.weight": (LBL, HID),
    "classifier.out_proj.bias": (LBL,),
}
_LAYER_KEY = re.compile(r"^roberta\.encoder\.layer\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    """What the student looks like; every field left as None takes the teacher's value."""

    layers: int | None = None  # default: the teacher's (or len(layer_map))
    hidden: int | None = None
    heads: int | None = None  # default: keep the teacher's head count (head size shrinks)
    intermediate: int | None = None  # default: teacher's intermediate scaled by hidden / teacher hidden
    layer_map: tuple[int, ...] | None = None  # explicit 0-based teacher layers, one per student layer
    id2label: tuple[str, ...] | None = None  # default: the teacher's labels


def select_evenly(n_big: int, n_small: int) -> torch.Tensor:
    """0-based int64 indices of `n_small` evenly spaced elements out of `n_big` (Xu et al. 2024)."""
    if not 1 <= n_small <= n_big:
        raise InputError(f"cannot select {n_small} evenly spaced elements out of {n_big} (need 1 <= {n_small} <= {n_big})")
    if n_big % n_small == 0:
        return torch.arange(n_small, dtype=torch.int64) * (n_big // n_small)
    # float64 so that the rounding is exact for any realistic size; ties round half to even.
    return torch.linspace(0, n_big - 1, n_small, dtype=torch.float64).round().to(torch.int64)


def hidden_indices(teacher_hidden: int, student_hidden: int) -> torch.Tensor:
    """Which teacher hidden units the student's hidden units were copied from (= `select_evenly`).

    Hidden-state distillation with `--hid-proj select` compares a student state `h_S [..., d]`
    with `h_T[..., hidden_indices(D, d)]`: the same units the residual stream was copied from,
    so at initialization the two line up unit by unit.
    """
    return select_evenly(teacher_hidden, student_hidden)


def head_indices(teacher_heads: int, student_heads: int) -> torch.Tensor:
    """The teacher head each student head was copied from (0-based)."""
    return select_evenly(teacher_heads, student_heads)


def attention_indices(teacher_cfg: XLMRConfig, student_cfg: XLMRConfig) -> torch.Tensor:
    """Teacher indices of the student's attention dimension (Q/K/V rows, attention-output columns).

    Student head j takes `select_evenly(head_T, head_S)` inside teacher head `head_indices[j]`,
    so no student head mixes units of two teacher heads.
    """
    within = select_evenly(teacher_cfg.head_dim, student_cfg.head_dim)  # [head_S]
    heads = head_indices(teacher_cfg.num_attention_heads, student_cfg.num_attention_heads)  # [h]
    return (heads[:, None] * teacher_cfg.head_dim + within[None, :]).reshape(-1)  # [h * head_S]


def layer_map(teacher_layers: int, student_layers: int, explicit=None) -> list[int]:
    """The 0-based teacher layer copied into each student layer.

    Without `explicit`: student layer i (1-based) takes teacher layer i * divisor (1-based),
    divisor = teacher_layers / student_layers, which must be whole (paper eq. 5).
    """
    if explicit is not None:
        explicit = [int(k) for k in explicit]
        if len(explicit) != student_layers:
            raise InputError(f"layer map {_fmt(explicit)} has {len(explicit)} entries for a {student_layers}-layer student")
        bad = [k for k in explicit if not 0 <= k < teacher_layers]
        if bad:
            raise InputError(f"layer map {_fmt(explicit)}: layer {bad[0]} is out of range for a {teacher_layers}-layer teacher (0-based, 0..{teacher_layers - 1})")
        if any(a >= b for a, b in zip(explicit, explicit[1:])):
            raise InputError(f"layer map {_fmt(explicit)} is not strictly increasing")
        return explicit
    if student_layers < 1:
        raise InputError(f"student layers {student_layers}: a student needs at least one layer")
    if student_layers > teacher_layers:
        raise InputError(f"student layers {student_layers}: deeper than its {teacher_layers}-layer teacher")
    if teacher_layers % student_layers:
        raise InputError(
            f"student layers {student_layers}: {teacher_layers} teacher layers / {student_layers} is not whole; "
            f"give an explicit layer map (--layer-map, 0-based teacher layers)"
        )
    divisor = teacher_layers // student_layers
    return [i * divisor - 1 for i in range(1, student_layers + 1)]


def student_config(teacher_cfg: XLMRConfig, spec: StudentSpec) -> XLMRConfig:
    """The teacher's config with the spec's sizes; checks that weights can be copied into it."""
    t = teacher_cfg
    layers = spec.layers if spec.layers is not None else len(spec.layer_map) if spec.layer_map is not None else t.num_hidden_layers
    layer_map(t.num_hidden_layers, layers, spec.layer_map)
    hidden = spec.hidden if spec.hidden is not None else t.hidden_size
    if not 1 <= hidden <= t.hidden_size:
        raise InputError(f"student hidden size {hidden}: must be between 1 and the teacher's {t.hidden_size} (a student can only be narrower)")
    heads = spec.heads if spec.heads is not None else t.num_attention_heads
    if not 1 <= heads <= t.num_attention_heads:
        raise InputError(f"student heads {heads}: must be between 1 and the teacher's {t.num_attention_heads}")
    if hidden % heads:
        raise InputError(f"student hidden size {hidden} is not a multiple of {heads} attention heads; choose --heads that divides it")
    if hidden // heads > t.head_dim:
        raise InputError(
            f"student head size {hidden // heads} ({hidden} / {heads} heads) exceeds the teacher's {t.head_dim}; "
            f"use at least {math.ceil(hidden / t.head_dim)} heads"
        )
    if spec.intermediate is not None:
        intermediate = spec.intermediate
    else:
        intermediate = max(1, round(t.intermediate_size * hidden / t.hidden_size))
    if not 1 <= intermediate <= t.intermediate_size:
        raise InputError(f"student intermediate size {intermediate}: must be between 1 and the teacher's {t.intermediate_size}")
    id2label = tuple(spec.id2label) if spec.id2label is not None else t.id2label
    if not id2label:
        raise InputError("student labels: the label list is empty")
    if len(set(id2label)) != len(id2label):
        raise InputError(f"student labels: {sorted({x for x in id2label if id2label.count(x) > 1})[0]!r} is listed twice")
    return t.replace(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                     intermediate_size=intermediate, id2label=id2label)


def copy_weights(teacher_sd: dict, teacher_cfg: XLMRConfig, spec: StudentSpec) -> tuple[XLMRConfig, dict]:
    """(student config, student state dict) copied from a teacher state dict, HF keys in and out.

    The teacher's encoder must be complete; the classifier is copied when present (all or none)
    and left out otherwise, for the caller to initialize. With `spec.id2label` the teacher's
    labels may be reordered, not changed: another label set needs a fresh head (from-base).
    LM-head and pooler keys are ignored. Returns new tensors in the teacher's dtype.
    """
    cfg = student_config(teacher_cfg, spec)
    sd = _checked_teacher(teacher_sd, teacher_cfg)
    layers = layer_map(teacher_cfg.num_hidden_layers, cfg.num_hidden_layers, spec.layer_map)
    index = {
        HID: hidden_indices(teacher_cfg.hidden_size, cfg.hidden_size),
        ATT: attention_indices(teacher_cfg, cfg),
        MLP: select_evenly(teacher_cfg.intermediate_size, cfg.intermediate_size),
        LBL: _label_order(teacher_cfg.id2label, cfg.id2label) if CLASSIFIER_PREFIX + "out_proj.weight" in sd else None,
    }
    out = {}
    for key, tensor in sd.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            out[key] = _narrow(tensor, _AXES[key], index)
        elif int(m.group(1)) in layers:
            student_key = f"roberta.encoder.layer.{layers.index(int(m.group(1)))}.{m.group(2)}"
            out[student_key] = _narrow(tensor, _LAYER_AXES[m.group(2)], index)
    return cfg, out


def _narrow(tensor: torch.Tensor, axes: tuple, index: dict) -> torch.Tensor:
    for dim, kind in enumerate(axes):
        idx = index.get(kind) if kind is not None else None
        if idx is not None and not torch.equal(idx, torch.arange(tensor.shape[dim])):
            tensor = tensor.index_select(dim, idx.to(tensor.device))
    return tensor.clone()


def _label_order(teacher_labels: tuple[str, ...], student_labels: tuple[str, ...]) -> torch.Tensor | None:
    if student_labels == teacher_labels:
        return None
    if sorted(student_labels) != sorted(teacher_labels):
        raise InputError(
            f"student labels {_fmt(student_labels, 6)} differ from the teacher's {_fmt(teacher_labels, 6)}; "
            f"from-teacher copies the teacher's head, so the labels may only be reordered (use from-base for new labels)"
        )
    return torch.tensor([teacher_labels.index(x) for x in student_labels], dtype=torch.int64)


def _checked_teacher(teacher_sd: dict, teacher_cfg: XLMRConfig) -> dict:
    shapes = expected_shapes(teacher_cfg)
    sd, _ = checked_tensors(teacher_sd, shapes, source="teacher state dict")
    missing = [k for k in shapes if k not in sd]
    head_missing = [k for k in missing if k.startswith(CLASSIFIER_PREFIX)]
    if len(missing) > len(head_missing) or 0 < len(head_missing) < 4:
        raise InputError(f"teacher state dict: tensor {missing[0]!r} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return sd


def scratch_state_dict(cfg: XLMRConfig, seed: int) -> dict:
    """transformers-style random init in HF keys: N(0, initializer_range) weights, zero biases,
    LayerNorm ones/zeros, zero padding rows (word and position embeddings). float32."""
    with torch.device("meta"):
        model = XLMRClassifier(cfg)
    model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_weights(model, cfg.initializer_range)
    return hf_state_dict(model)


def _seeded_classifier(cfg: XLMRConfig, seed: int, dtype: torch.dtype) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fresh_classifier(cfg, dtype=dtype)


def init_student(init: str, spec: StudentSpec, *, teacher: str | Path | None = None,
                 base: str | Path | None = None, seed: int = 0) -> tuple[XLMRConfig, dict]:
    """(student config, HF state dict) for one of the paper's three initializations.

    - from-teacher: copy the fine-tuned teacher, classification head included.
    - from-base: copy the pretrained base's encoder (an MLM checkpoint's LM head is ignored); the
      head is always fresh (seeded), for `spec.id2label`, else the teacher's labels when a teacher
      is given, else the base's.
    - from-scratch: no copy; sizes from the teacher's config (else the base's) and the spec.
    """
    if init not in INITS:
        raise InputError(f"--init {init!r}: unknown initialization; choose one of {', '.join(INITS)}")
    teacher_cfg = XLMRConfig.from_hf(teacher) if teacher is not None else None
    if init == "from-teacher":
        if teacher is None:
            raise InputError("--teacher: from-teacher needs the teacher checkpoint directory")
        teacher_cfg, sd = read_hf_state_dict(teacher, init_missing_classifier=False)
        if not any(k.startswith(CLASSIFIER_PREFIX) for k in sd):
            raise InputError(f"{teacher}: the teacher checkpoint has no classification head; use --init from-base for a base model")
        return copy_weights(sd, teacher_cfg, spec)
    if init == "from-base":
        if base is None:
            raise InputError("--base: from-base needs the pretrained base checkpoint directory (e.g. xlm-roberta-base)")
        base_cfg, sd = read_hf_state_dict(base, init_missing_classifier=False)
        if teacher_cfg is not None and teacher_cfg.vocab_size != base_cfg.vocab_size:
            raise InputError(f"{base}: vocab_size {base_cfg.vocab_size} differs from the teacher's {teacher_cfg.vocab_size} (the student uses the teacher's tokenizer)")
        if any(k.startswith(CLASSIFIER_PREFIX) for k in sd):
            log.info("%s: discarding the base checkpoint's classifier (from-base always starts a fresh head)", base)
        body = {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER_PREFIX)}
        labels = spec.id2label if spec.id2label is not None else teacher_cfg.id2label if teacher_cfg is not None else None
        cfg, out = copy_weights(body, base_cfg, dataclasses.replace(spec, id2label=labels))
        out.update(_seeded_classifier(cfg, seed, dtype=sd["roberta.embeddings.word_embeddings.weight"].dtype))
        return cfg, out
    source_cfg = teacher_cfg if teacher_cfg is not None else XLMRConfig.from_hf(base) if base is not None else None
    if source_cfg is None:
        raise InputError("--teacher/--base: from-scratch takes its sizes from the teacher's (or base's) config.json; give one")
    cfg = student_config(source_cfg, spec)
    return cfg, scratch_state_dict(cfg, seed)


def parameter_count(sd: dict) -> int:
    return sum(t.numel() for t in sd.values())


def _fmt(items, limit: int = 12) -> str:
    items = list(items)
    shown = ",".join(str(x) for x in items[:limit])
    return shown + (f",... ({len(items)} in all)" if len(items) > limit else "")


def _check_out(out: Path, overwrite: bool, inputs: dict[str, Path | None]) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    check_apart("--out", out, inputs)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out}: directory is not empty; pass --overwrite to replace its config.json/model.safetensors/tokenizer.json")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m xlmr_mini.copy_weights",
        description="Initialize a smaller XLM-R student by copying weights (paper §2.2) and save it as an HF directory. "
        "Sizes left out are the teacher's; e.g. --layers 6 --hidden 384 takes teacher layers 2,4,...,12 (1-based) "
        "and evenly spaced units of every weight.",
    )
    p.add_argument("--init", choices=INITS, default="from-teacher", help="where the weights come from (default: from-teacher)")
    p.add_argument("--teacher", type=Path, help="fine-tuned teacher directory (from-teacher; sizes and labels otherwise)")
    p.add_argument("--base", type=Path, help="pretrained base directory, e.g. xlm-roberta-base (from-base)")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory: the student's config.json and model.safetensors, and the source's tokenizer.json")
    p.add_argument("--layers", type=int, help="student layers (default: the teacher's; must divide them unless --layer-map)")
    p.add_argument("--layer-map", nargs="+", action=IntList,
                   help="explicit 0-based teacher layers, one per student layer, space-separated, e.g. 0 2 4 7 9 11")
    p.add_argument("--hidden", type=int, help="student hidden size (default: the teacher's)")
    p.add_argument("--heads", type=int, help="student attention heads (default: the teacher's; the head size shrinks)")
    p.add_argument("--intermediate", type=int, help="student MLP size (default: the teacher's, scaled like --hidden)")
    p.add_argument("--labels", help="comma-separated labels in id order (default: the teacher's)")
    p.add_argument("--seed", type=int, default=0, help="seed for fresh weights (from-base head, from-scratch)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out directory")
    return p


@cli_main
def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    spec = StudentSpec(
        layers=args.layers, hidden=args.hidden, heads=args.heads, intermediate=args.intermediate,
        layer_map=tuple(args.layer_map) if args.layer_map else None,
        id2label=tuple(x.strip() for x in args.labels.split(",")) if args.labels else None,
    )
    sources = [p for p in (args.teacher, args.base) if p is not None]
    _check_out(args.out, args.overwrite, {"--teacher": args.teacher, "--base": args.base})
    cfg, sd = init_student(args.init, spec, teacher=args.teacher, base=args.base, seed=args.seed)
    source = args.base if args.init == "from-base" else args.teacher if args.teacher is not None else args.base
    source_cfg = XLMRConfig.from_hf(source)
    tokenizer = next((t for t in (find_tokenizer(p) for p in sources) if t is not None), None)
    save_hf(args.out, cfg, sd, tokenizer_file=tokenizer)
    copied = "none (random init)" if args.init == "from-scratch" else _fmt(layer_map(source_cfg.num_hidden_layers, cfg.num_hidden_layers, spec.layer_map))
    n_source = sum(math.prod(s) for s in expected_shapes(source_cfg).values())
    print(
        f"{args.init}: source layers {copied} (0-based) -> {cfg.num_hidden_layers} layers; "
        f"hidden {source_cfg.hidden_size}->{cfg.hidden_size}, heads {source_cfg.num_attention_heads}x{source_cfg.head_dim}"
        f"->{cfg.num_attention_heads}x{cfg.head_dim}, intermediate {source_cfg.intermediate_size}->{cfg.intermediate_size}, "
        f"{cfg.num_labels} labels; parameters {n_source / 1e6:.2f}M -> {parameter_count(sd) / 1e6:.2f}M; "
        f"wrote {args.out}" + ("" if tokenizer else " (no tokenizer.json in the source)")
    )


if __name__ == "__main__":
    main()
