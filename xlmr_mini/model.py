"""XLM-R for sequence classification, natively in PyTorch, numerically equal to transformers.

Embeddings -> N post-LN encoder layers -> classification head on `<s>`. Attention runs through
`F.scaled_dot_product_attention`, except in the layers a caller taps for knowledge distillation:
there it is computed explicitly so the pre-softmax scores and/or probabilities can be returned.
Untapped layers keep nothing extra.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from xlmr_mini.config import XLMRConfig


@dataclasses.dataclass(frozen=True)
class Taps:
    """What a forward pass records for distillation; `layers` are 0-based encoder layer indices."""

    layers: tuple[int, ...] = ()
    embeddings: bool = False  # the embedding output (after LayerNorm/dropout)
    hidden: bool = False  # each tapped layer's output
    scores: bool = False  # pre-softmax QK^T/sqrt(d), dtype min at masked keys, [B, H, T, T]
    probs: bool = False  # softmax of the scores, [B, H, T, T]
    qk: bool = False  # the layer's Q and K, [B, H, T, d], for attention KD without T x T maps


@dataclasses.dataclass
class Output:
    logits: torch.Tensor  # [B, num_labels]
    embeddings: torch.Tensor | None = None  # [B, T, D]
    hidden: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per tapped layer, [B, T, D]
    scores: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per tapped layer, [B, H, T, T]
    probs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    q: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per tapped layer, [B, H, T, d]
    k: list[torch.Tensor] = dataclasses.field(default_factory=list)


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A bijection of int32 values (murmur3's finalizer; right shifts masked to be logical)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * -2048144789  # 0x85EBCA6B as an int32
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * -1028477387  # 0xC2B2AE35
    return h ^ ((h >> 16) & 0xFFFF)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout. On CPU each element's mask bit comes from a hash of its position and a seed
    drawn from torch's generator (one draw per call): a few integer ops that torch.compile fuses
    and vectorizes, where a random number per element from torch's generator (eager) or
    inductor's (compiled) cost 5-8x more than the LayerNorm it follows. Keep probability within
    2^-24 of 1 - p. Elsewhere (CUDA) torch's own dropout."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    seed = torch.randint(-2**31, 2**31 - 1, (), dtype=torch.int32)
    position = torch.arange(x.numel(), dtype=torch.int32).view(x.shape)
    keep = (_mix32(_mix32(position) ^ seed) & 0xFFFFFF) >= round(p * 2**24)
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


class Dropout(nn.Module):
    """`dropout` as a module, in place of nn.Dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def position_ids(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """RoBERTa's rule: positions count non-pad tokens from pad_id + 1; pads get pad_id."""
    not_pad = input_ids.ne(pad_id).int()
    return (torch.cumsum(not_pad, dim=1) * not_pad).long() + pad_id


class Embeddings(nn.Module):
    def __init__(self, cfg: XLMRConfig):
        super().__init__()
        self.pad_id = cfg.pad_token_id
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # token_type_ids are all zero for XLM-R: add row 0 rather than gather a [B, T] index.
        x = self.word(input_ids) + self.token_type.weight[0] + self.position(position_ids(input_ids, self.pad_id))
        return self.dropout(self.norm(x))


class Attention(nn.Module):
    def __init__(self, cfg: XLMRConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, d]

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None, taps: Taps | None, out: Output,
                first_only: bool = False) -> torch.Tensor:
        """x [B, T, D]; keep [B, 1, 1, T] bool (True = attend) or None; taps only on tapped layers.
        first_only: queries (and the output) for the `<s>` position alone, [B, 1, D]."""
        q = self._heads(self.q(x[:, :1] if first_only else x))
        k, v = self._heads(self.k(x)), self._heads(self.v(x))
        dropout_p = self.dropout_p if self.training else 0.0
        if taps is not None and taps.qk:
            out.q.append(q)
            out.k.append(k)
        # SDPA's own dropout draws torch's masks; on CPU the attention dropout is `dropout`'s hashed
        # one (below), so that a layer draws the same mask tapped or not (the fused KD loss taps Q
        # and K only: its run must draw the reference's masks).
        explicit = taps is not None and (taps.scores or taps.probs) or (dropout_p > 0 and x.device.type == "cpu")
        if not explicit:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # [B, H, T, T]
            if keep is not None:
                # transformers adds the dtype's min at masked keys; in floating point that is this.
                scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            if taps is not None and taps.scores:
                out.scores.append(scores)
            if taps is not None and taps.probs:
                out.probs.append(probs)
            y = dropout(probs, dropout_p, self.training) @ v
        b, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, -1))  # [B, T, D]


class Layer(nn.Module):
    def __init__(self, cfg: XLMRConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = nn.ModuleDict(
            {"up": nn.Linear(cfg.hidden_size, cfg.intermediate_size), "down": nn.Linear(cfg.intermediate_size, cfg.hidden_size)}
        )
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, keep, taps: Taps | None, out: Output, first_only: bool = False) -> torch.Tensor:
        y = self.attn(x, keep, taps, out, first_only)
        x = self.attn_norm((x[:, :1] if first_only else x) + self.dropout(y))
        h = self.mlp["down"](F.gelu(self.mlp["up"](x)))
        return self.mlp_norm(x + self.dropout(h))


class ClassificationHead(nn.Module):
    """dense -> tanh -> out_proj on the `<s>` token, with dropout before each projection."""

    def __init__(self, cfg: XLMRConfig):
        super().__init__()
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(x[:, 0])))  # [B, D]
        return self.out_proj(self.dropout(x))  # [B, num_labels]


class XLMRClassifier(nn.Module):
    def __init__(self, cfg: XLMRConfig):
        super().__init__()
        self.cfg = cfg
        # Activation checkpointing in training (`--recompute`): each layer keeps only its input
        # for the backward pass and runs its forward again there. The same numbers (the recompute
        # replays torch's RNG state, so dropout draws the same masks) for a second forward pass.
        self.recompute = False
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.head = ClassificationHead(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                taps: Taps | None = None) -> Output:
        """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = pad; default: all tokens)."""
        x = self.embed(input_ids)  # [B, T, D]
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        out = Output(logits=x.new_empty(0))
        tapped = set(taps.layers) if taps is not None else set()
        if taps is not None and taps.embeddings:
            out.embeddings = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_taps = taps if i in tapped else None
            # The head reads only `<s>`: an untapped last layer computes that one position (the
            # keys and values still see every token), the same numbers for 1/T of the work.
            first_only = i == last and layer_taps is None
            if self.recompute and self.training and torch.is_grad_enabled():
                x = _recomputed(layer, x, keep, layer_taps, out, first_only)
            else:
                x = layer(x, keep, layer_taps, out, first_only=first_only)
            if layer_taps is not None and taps.hidden:
                out.hidden.append(x)
        out.logits = self.head(x)
        return out


def _recomputed(layer: Layer, x, keep, taps: Taps | None, out: Output, first_only: bool) -> torch.Tensor:
    """`layer` under activation checkpointing. Its taps come back as outputs of the checkpointed
    function and are recorded here, so the recomputation in the backward pass records nothing."""
    def run(x):
        own = Output(logits=x.new_empty(0))
        y = layer(x, keep, taps, own, first_only=first_only)
        return y, own.scores, own.probs, own.q, own.k

    y, scores, probs, q, k = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
    out.scores += scores
    out.probs += probs
    out.q += q
    out.k += k
    return y


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """transformers' init: N(0, std) weights, zero biases, LayerNorm ones/zeros, zero padding row."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
