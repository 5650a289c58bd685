"""TinyBERT's distillation objective (paper §2.1, eqs. 1-4), the one PyTorch reference of it.

    L_overall = L_att + L_hid + L_embd + L_pred + L_clf      (each weighted, default 1)

Student layer i (1-based) is matched to teacher layer k = i * divisor (eq. 5); `layer_map` from
`copy_weights` gives the 0-based teacher layer per student layer, the same one the weight copy
used. Two normalisations (`loss_norm`):

`masked` (default; the kernels in `xlmr_mini.kernels` compute the same and are checked against
this file's reference path). Padding never counts, and every layer term is a mean over layers:
- L_hid (eq. 2) and L_embd (eq. 3): per layer, the sum of squared differences over real tokens
  and hidden units divided by (n_real_tokens * D_teacher); L_hid is the mean over student
  layers. `layer_mse_reference` is the definition.
- L_att (eq. 1): entry (b, h, q, k) of the [B, H, T, T] map counts iff both the query q and the
  key k are real tokens of sequence b; per layer the sum over counted entries divided by
  (H * sum_b n_b^2), the mean over heads of each head's MSE over its real entries; then the mean
  over student layers. `attention_map_mse_reference` is the definition.

`tinybert`: what TinyBERT's `task_distill.py` computes, literally. Per layer `nn.MSELoss()`, the
mean over every position of the padded batch, pads included (B*H*T^2 attention entries, B*T*D
hidden units), with attention entries <= -100 (masked keys of pre-softmax scores) set to 0 in
both models; the layers are summed, not averaged. On short texts padded to a longer batch this
makes the attention term many times smaller than the masked mean (~20x on tweets), and with 6
student layers the hidden term ~6x larger.

The other terms are the same under both:
- L_pred (eq. 4): MSE of the logits, mean over batch and classes (no temperature, as the paper).
- L_clf: cross-entropy of the student's logits against the gold labels.

The attention target. `probs` (default): the softmax probabilities, what the paper's eq. 1 reads
as "attention outputs" on transformers. `scores`: the pre-softmax QK^T/sqrt(d) of TinyBERT's
code, which holds the dtype's min at masked keys (never multiplied by 0) and whose loss is
hundreds of times larger than the probabilities' (~600 vs ~0.2 on a batch of tweets), so it
swamps every other term unless weighted down.

Width. When the student is narrower than the teacher, W in eqs. 2-3 is either a learnable linear
map student -> teacher width (`HiddenProjection`, TinyBERT's `fit_dense`; trained with the
student, kept in the training checkpoint, not in the exported student) or, with `select`, no
parameters: the student is compared with the teacher's evenly spaced units, the ones the weight
copy took (`copy_weights.hidden_indices`). Then the MSE divides by the student's width.

Attention may be compared as materialized maps (`impl="reference"`: taps `scores` or `probs`)
or from Q and K without T x T maps (`impl="fused"`: taps `qk`, Triton kernels on GPU; masked
normalisation only). Both need the student to have the teacher's head count.

Data parallel. Every term above is a mean: a sum over the batch divided by a count (real tokens,
counted attention entries, padded positions, sequences). When the global batch is split across
ranks, `kd_loss(..., counts=LossCounts)` divides each rank's local sums by the global batch's
counts (all-reduced by the caller, `distributed.global_counts`), so the ranks' losses add up to
the single-process loss of the global batch, and so do their gradients (the caller multiplies by
the world size, as DDP averages gradients over ranks). `counts=None` (one process) is the plain
means, unchanged. Both implementations take them (the kernels read their denominators from them).
"""
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from xlmr_mini.copy_weights import hidden_indices
from xlmr_mini.errors import InputError
from xlmr_mini.kernels.attention_kd import (
    attention_map_mse_reference,
    attention_prob_mse,
    attention_score_mse,
)
from xlmr_mini.kernels.layer_mse import layer_mse, layer_mse_reference
from xlmr_mini.model import Output, Taps

TERMS = ("att", "hid", "embd", "pred", "clf")
ATT_TARGETS = ("scores", "probs")
HID_PROJS = ("linear", "select")
IMPLS = ("reference", "fused")
LOSS_NORMS = ("masked", "tinybert")


@dataclasses.dataclass(frozen=True)
class KDLossConfig:
    kd: bool = True  # False: L_clf only (the paper's NON-KD rows)
    att_target: str = "probs"  # probs: softmax (the paper's eq. 1) | scores: pre-softmax (TinyBERT's code)
    hid_proj: str = "linear"  # W for a narrower student: linear (fit_dense) | select
    impl: str = "reference"  # reference: PyTorch on materialized maps | fused: the kernels
    loss_norm: str = "masked"  # masked: real tokens only, mean over layers | tinybert: its code's means, summed
    w_att: float = 1.0
    w_hid: float = 1.0
    w_embd: float = 1.0
    w_pred: float = 1.0
    w_clf: float = 1.0

    def __post_init__(self):
        for name, value, choices in (("att_target", self.att_target, ATT_TARGETS),
                                     ("hid_proj", self.hid_proj, HID_PROJS), ("impl", self.impl, IMPLS),
                                     ("loss_norm", self.loss_norm, LOSS_NORMS)):
            if value not in choices:
                raise InputError(f"{name} {value!r}: choose one of {', '.join(choices)}")
        if self.loss_norm == "tinybert" and self.impl == "fused":
            raise InputError("--loss-norm tinybert runs on the reference implementation; use --kd-impl reference")

    def weights(self) -> dict[str, float]:
        return {"att": self.w_att, "hid": self.w_hid, "embd": self.w_embd, "pred": self.w_pred, "clf": self.w_clf}


@dataclasses.dataclass(frozen=True)
class LossCounts:
    """The denominators of the loss's means, over the whole batch (int64 scalars); see the module
    docstring, "Data parallel". `of(mask)` counts one batch; ranks sum theirs."""

    rows: torch.Tensor  # sequences: cross-entropy, logits MSE (x classes)
    tokens: torch.Tensor  # real tokens, sum_b n_b: hidden-state MSE (x D)
    token_pairs: torch.Tensor  # counted attention entries per head, sum_b n_b^2
    positions: torch.Tensor  # padded positions, B * T: TinyBERT's hidden-state means (x D)
    position_pairs: torch.Tensor  # padded attention entries per head, B * T^2: TinyBERT's attention means

    @classmethod
    def of(cls, mask: torch.Tensor) -> "LossCounts":
        n = mask.bool().sum(dim=1)  # [B]
        b, t = mask.shape
        # new_full, not new_tensor: filled on the mask's device, no host-to-device copy per step.
        return cls.unstack(torch.stack([n.new_full((), b), n.sum(), n.square().sum(), n.new_full((), b * t),
                                        n.new_full((), b * t * t)]))

    def stack(self) -> torch.Tensor:
        return torch.stack([getattr(self, f.name) for f in dataclasses.fields(self)])  # [5]

    @classmethod
    def unstack(cls, values: torch.Tensor) -> "LossCounts":
        return cls(*values.to(torch.int64).unbind())


def kd_taps(cfg: KDLossConfig, layers) -> Taps | None:
    """What a model records for the loss: `layers` (0-based) with hidden states and attention,
    plus the embeddings. None without KD (the forward then keeps nothing)."""
    if not cfg.kd:
        return None
    fused = cfg.impl == "fused"
    return Taps(layers=tuple(sorted(set(layers))), embeddings=True, hidden=True,
                scores=not fused and cfg.att_target == "scores",
                probs=not fused and cfg.att_target == "probs", qk=fused)


class HiddenProjection(nn.Module):
    """W of eqs. 2-3: identity at equal widths, else `fit_dense` (linear) or unit selection.

    `forward(h_s, h_t)` returns the pair to compare, both of the same width.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int, mode: str = "linear"):
        super().__init__()
        if student_hidden > teacher_hidden:
            raise InputError(f"student hidden size {student_hidden} is wider than the teacher's {teacher_hidden}")
        if mode not in HID_PROJS:
            raise InputError(f"hid_proj {mode!r}: choose one of {', '.join(HID_PROJS)}")
        self.mode = "identity" if student_hidden == teacher_hidden else mode
        self.fit_dense = nn.Linear(student_hidden, teacher_hidden) if self.mode == "linear" else None
        if self.fit_dense is not None:  # BERT-style init, as TinyBERT's fit_dense gets
            nn.init.normal_(self.fit_dense.weight, std=0.02)
            nn.init.zeros_(self.fit_dense.bias)
        index = hidden_indices(teacher_hidden, student_hidden) if self.mode == "select" else torch.empty(0, dtype=torch.long)
        self.register_buffer("index", index, persistent=False)

    def forward(self, h_s: torch.Tensor, h_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "linear":
            return self.fit_dense(h_s), h_t
        if self.mode == "select":
            return h_s, h_t.index_select(-1, self.index)
        return h_s, h_t


def _upcast(x: torch.Tensor) -> bool:
    # The references' `upcast` turns anything into fp32; fp64 (gradcheck) must stay fp64.
    return x.dtype in (torch.float16, torch.bfloat16)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if _upcast(x) else x


def _hidden_mse(h_s, h_t, mask, fused: bool, counts: LossCounts | None) -> torch.Tensor:
    """[L, B, T, D] pair -> [L]."""
    tokens = None if counts is None else counts.tokens
    if fused:
        return layer_mse(h_s, h_t.to(h_s.dtype), mask, tokens)
    return layer_mse_reference(h_s, h_t, mask, upcast=_upcast(h_s), tokens=tokens)


def _attention_mse(s: Output, t: Output, pos: list[int], mask, cfg: KDLossConfig,
                   counts: LossCounts | None) -> torch.Tensor:
    """[L] over student layers; teacher layer of student layer i is t's tapped entry pos[i]."""
    pairs = None if counts is None else counts.token_pairs
    if cfg.impl == "fused":
        q_s, k_s = torch.stack(s.q), torch.stack(s.k)  # [L, B, H, T, d_s]
        q_t = torch.stack([t.q[p] for p in pos]).to(q_s.dtype)  # [L, B, H, T, d_t]
        k_t = torch.stack([t.k[p] for p in pos]).to(q_s.dtype)
        fn = attention_score_mse if cfg.att_target == "scores" else attention_prob_mse
        return fn(q_s, k_s, q_t, k_t, mask, pairs)
    maps_s = s.scores if cfg.att_target == "scores" else s.probs
    maps_t = t.scores if cfg.att_target == "scores" else t.probs
    a_s = torch.stack(maps_s)  # [L, B, H, T, T]
    a_t = torch.stack([maps_t[p] for p in pos])
    return attention_map_mse_reference(a_s, a_t, mask, upcast=_upcast(a_s), token_pairs=pairs)


def teacher_positions(layer_map: list[int]) -> list[int]:
    """Index, in the teacher's tapped lists (sorted layers), of each student layer's target."""
    tapped = sorted(set(layer_map))
    return [tapped.index(k) for k in layer_map]


def kd_loss(student_out: Output, teacher_out: Output | None, labels: torch.Tensor, mask: torch.Tensor,
            cfg: KDLossConfig, proj: HiddenProjection | None = None,
            layer_map: list[int] | None = None,
            counts: LossCounts | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(L_overall, {"att", "hid", "embd", "pred", "clf"}) as fp32 scalars (KD terms 0 without KD).

    student_out: taps of every student layer (`kd_taps(cfg, range(L_s))`); teacher_out: taps of
    the layers `layer_map` names (`kd_taps(cfg, layer_map)`), computed without grad; mask [B, T]
    (1 = token). `proj` maps student to teacher width (None: identity). `counts`: the global
    batch's denominators when this batch is one rank's share of it (None: this batch's own).
    """
    z_s = _at_least_fp32(student_out.logits)
    if counts is None:
        terms = {"clf": F.cross_entropy(z_s, labels)}
    else:
        terms = {"clf": F.cross_entropy(z_s, labels, reduction="sum") / counts.rows}
    if not cfg.kd:
        zero = terms["clf"].new_zeros(())
        terms = {"att": zero, "hid": zero, "embd": zero, "pred": zero, **terms}
    else:
        terms = {**_kd_terms(student_out, teacher_out, mask, cfg, proj, layer_map, counts), **terms}
    weights = cfg.weights()
    total = sum(weights[name] * terms[name] for name in TERMS)
    return total, terms


def _kd_terms(s: Output, t: Output, mask, cfg: KDLossConfig, proj, layer_map,
              counts: LossCounts | None) -> dict[str, torch.Tensor]:
    if len(layer_map) != len(s.hidden):
        raise ValueError(f"layer_map has {len(layer_map)} entries for {len(s.hidden)} tapped student layers")
    pos = teacher_positions(layer_map)
    fused = cfg.impl == "fused"
    proj = proj if proj is not None else (lambda a, b: (a, b))
    logits_count = None if counts is None else counts.rows * s.logits.shape[-1]
    if cfg.loss_norm == "tinybert":
        return _tinybert_terms(s, t, pos, cfg, proj, counts, logits_count)
    h_s, h_t = proj(torch.stack(s.hidden), torch.stack([t.hidden[p] for p in pos]))  # [L, B, T, D]
    e_s, e_t = proj(s.embeddings[None], t.embeddings[None])  # [1, B, T, D]
    # Subtractions, not F.mse_loss: the teacher's tensors may be inference tensors, which autograd
    # must never save; a difference saves nothing of its inputs.
    return {
        "att": _attention_mse(s, t, pos, mask, cfg, counts).mean(),
        "hid": _hidden_mse(h_s, h_t, mask, fused, counts).mean(),
        "embd": _hidden_mse(e_s, e_t, mask, fused, counts)[0],
        "pred": _mean_square_error(s.logits, t.logits, logits_count),
    }


def _mean_square_error(a: torch.Tensor, b: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """`nn.MSELoss()(a, b)` in at least fp32, as a difference (saves nothing of an inference tensor);
    with `count`, the sum of squares over `count` elements (a rank's part of a global batch's mean)."""
    a = _at_least_fp32(a)
    square = (a - b.to(a.dtype)).square()
    return square.mean() if count is None else square.sum() / count


def _zero_masked(x: torch.Tensor) -> torch.Tensor:
    # TinyBERT: torch.where(att <= -1e2, 0, att), aimed at the -10000 added at masked keys.
    return torch.where(x <= -1e2, torch.zeros_like(x), x)


def _tinybert_terms(s: Output, t: Output, pos: list[int], cfg: KDLossConfig, proj, counts: LossCounts | None,
                    logits_count) -> dict[str, torch.Tensor]:
    """TinyBERT's task_distill.py normalisation: per layer the mean over the whole padded batch,
    summed over layers (its rep_loss is our L_hid + L_embd)."""
    maps_s = s.scores if cfg.att_target == "scores" else s.probs
    maps_t = t.scores if cfg.att_target == "scores" else t.probs

    def count(unit: str, per_unit: int):  # the global batch's element count: positions (x T) x per_unit
        return None if counts is None else getattr(counts, unit) * per_unit

    att = sum(_mean_square_error(_zero_masked(a), _zero_masked(maps_t[p]), count("position_pairs", a.shape[1]))
              for a, p in zip(maps_s, pos))  # a [B, H, T, T]
    pairs = [proj(h, t.hidden[p]) for h, p in zip(s.hidden, pos)]  # [B, T, D] each
    hid = sum(_mean_square_error(h_s, h_t, count("positions", h_s.shape[-1])) for h_s, h_t in pairs)
    e_s, e_t = proj(s.embeddings, t.embeddings)
    embd = _mean_square_error(e_s, e_t, count("positions", e_s.shape[-1]))
    pred = _mean_square_error(s.logits, t.logits, logits_count)
    return {"att": att, "hid": hid, "embd": embd, "pred": pred}
