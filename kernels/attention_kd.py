"""Masked attention KD losses (TinyBERT's L_att): on materialized maps, and flash-style from Q, K.

Scope and layouts (L layers, B sequences, H heads, T tokens, d head dim; `mask` is [B, T], bool or
0/1 int, True/1 for valid tokens, shared by student and teacher):

- `attention_map_mse(a_s, a_t, mask)`: a_s, a_t [L, B, H, T, T], scores or probabilities already
  materialized. Fused Triton kernel, one launch for all layers, gradient made in the forward pass.
- `attention_score_mse(q_s, k_s, q_t, k_t, mask)`: q_s, k_s [L, B, H, T, d_s], q_t, k_t
  [L, B, H, T, d_t]; the target is the pre-softmax score S = Q K^T / sqrt(d), each side scaled by
  its own head dim (the student may have narrower heads, same head count). The kernels tile over
  (query block, key block) and never hold a T x T map in memory: memory is linear in T. Backward
  recomputes the score tiles (flash-style) to give dQ_s and dK_s in two launches (one owning query
  blocks, one owning key blocks), so no atomics.
- `attention_prob_mse(q_s, k_s, q_t, k_t, mask)`: the same on probabilities P = softmax(S) over
  the valid keys of each row. A first pass per query block finds each row's log-sum-exp for student
  and teacher; the loss pass also keeps delta_q = sum_k (P_s - P_t) P_s, so backward needs only
  [L, B, H, T] vectors besides Q and K.

Definition, per layer: entry (b, h, q, k) counts iff mask[b, q] and mask[b, k]; with n_b the valid
tokens of sequence b,

    loss[l] = sum_{counted} (A_s - A_t)^2 / (H * sum_b n_b^2)

Masked entries are excluded with `torch.where` (maps may hold -inf or finfo.min at masked keys;
they are never multiplied by 0). A batch with no valid token gives 0 (denominator clamped to 1).
The Q/K losses take `token_pairs` to divide by another sum_b n_b^2 (a data-parallel rank's share of
a global batch divides by the global batch's).

Caveats: the teacher is a constant target and gets no gradient. fp32 scores use IEEE fp32 dots
(`input_precision="ieee"`, on the FMA units), not TF32: TF32 keeps 10 mantissa bits (~1e-3
relative error per product), far outside the 1e-5 the fp32 path is tested to, so fp32 stays exact
and compute-bound (bench/RESULTS.md, roofline estimate); bf16 is the fast path, bf16 dots on tensor
cores with fp32 accumulation. Per-program partial sums are added in a fixed order: results are
bit-reproducible run to run. Head dims are padded to a power of two >= 16 inside the kernel.
Student and teacher may differ in dtype; the dot precision follows the student's. Under Triton's
CPU interpreter, 16-bit operands are upcast before `tl.dot` (the interpreter's bf16 dot is broken),
so CPU tests check the bf16 numerics but not the GPU's bf16 dot code path.
The probabilities variant assumes no attention bias besides the padding mask (XLM-R's case).

Dispatch: Triton on CUDA tensors or under TRITON_INTERPRET=1, else the references.

Hardware: correctness checked on CPU through the interpreter only. Compiled ahead of time for
sm_80 (A100) and sm_90 (H100) with Triton 3.6 and 3.9 (`python -m bench.kernels_aot`): at the launch
configs `map_mse_config` and `score_mse_config` pick, no kernel spills registers and each fits
2-4 blocks per SM (tests/test_kernels_aot.py holds that). GPU speed not yet measured.
"""
import math

import torch

from ._dispatch import (LaunchConfig, cdiv, interpreting, launch, next_power_of_2, tl, triton,
                        use_triton)


# ---------------------------------------------------------------------------------------------
# References: the definitions, and what tests and benchmarks compare against.
# ---------------------------------------------------------------------------------------------
def _att_denominator(mask: torch.Tensor, heads: int, token_pairs: torch.Tensor | None = None) -> torch.Tensor:
    if token_pairs is None:
        n = mask.bool().sum(dim=1)  # [B]
        token_pairs = n.square().sum()
    return (heads * token_pairs).clamp(min=1)


def attention_map_mse_reference(a_s: torch.Tensor, a_t: torch.Tensor, mask: torch.Tensor,
                                upcast: bool = True, token_pairs: torch.Tensor | None = None) -> torch.Tensor:
    """[L, B, H, T, T] x2, mask [B, T] -> [L]; fp32 if `upcast`, else in the inputs' dtype.

    `token_pairs`: sum_b n_b^2 to divide by instead of this batch's, e.g. the global batch's when
    each data-parallel rank holds a share of it (the result is then the rank's part of the loss)."""
    if upcast:
        a_s, a_t = a_s.float(), a_t.float()
    m = mask.bool()
    valid = (m[:, :, None] & m[:, None, :])[None, :, None]  # [1, B, 1, T, T]
    diff = torch.where(valid, a_s, 0.0) - torch.where(valid, a_t, 0.0)
    return diff.square().sum(dim=(1, 2, 3, 4)) / _att_denominator(mask, a_s.shape[2], token_pairs)


def attention_scores(q: torch.Tensor, k: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """Materialized pre-softmax scores Q K^T / sqrt(d): [..., T, d] x2 -> [..., T, T]."""
    if upcast:
        q, k = q.float(), k.float()
    return q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor,
                    upcast: bool = True) -> torch.Tensor:
    """Softmax over the valid keys: [L, B, H, T, d] x2, mask [B, T] -> [L, B, H, T, T]."""
    s = attention_scores(q, k, upcast)
    key_ok = mask.bool()[None, :, None, None, :]  # [1, B, 1, 1, T]
    # finfo.min, not -inf: a row with no valid key stays finite (and is excluded from the loss).
    return torch.where(key_ok, s, torch.finfo(s.dtype).min).softmax(dim=-1)


def attention_score_mse_reference(q_s, k_s, q_t, k_t, mask, upcast: bool = True,
                                  token_pairs: torch.Tensor | None = None) -> torch.Tensor:
    """L_att on pre-softmax scores, by materializing both [L, B, H, T, T] maps."""
    return attention_map_mse_reference(attention_scores(q_s, k_s, upcast),
                                       attention_scores(q_t, k_t, upcast), mask, upcast, token_pairs)


def attention_prob_mse_reference(q_s, k_s, q_t, k_t, mask, upcast: bool = True,
                                 token_pairs: torch.Tensor | None = None) -> torch.Tensor:
    """L_att on attention probabilities, by materializing both [L, B, H, T, T] maps."""
    return attention_map_mse_reference(attention_probs(q_s, k_s, mask, upcast),
                                       attention_probs(q_t, k_t, mask, upcast), mask, upcast, token_pairs)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _map_mse_kernel(s_ptr, t_ptr, mask_ptr, grad_ptr, partial_ptr, denom_ptr, BH, H, T,
                    n_q_blocks, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    layer = tl.program_id(0)
    bh = tl.program_id(1)
    q_block = tl.program_id(2)
    b = bh // H
    q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < T
    mq = (tl.load(mask_ptr + b * T + q, mask=q_ok, other=0) != 0) & q_ok
    two_over_denom = 2.0 / tl.load(denom_ptr)
    base = (layer * BH + bh).to(tl.int64) * T * T
    acc = tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, T, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < T
        mk = (tl.load(mask_ptr + b * T + k, mask=k_ok, other=0) != 0) & k_ok
        in_bounds = q_ok[:, None] & k_ok[None, :]
        offs = base + q[:, None].to(tl.int64) * T + k[None, :]
        s = tl.load(s_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        valid = mq[:, None] & mk[None, :]
        diff = tl.where(valid, s, 0.0) - tl.where(valid, t, 0.0)
        acc += diff * diff
        tl.store(grad_ptr + offs, diff * two_over_denom, mask=in_bounds)
    slot = (layer * BH + bh) * n_q_blocks + q_block
    tl.store(partial_ptr + slot, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's CPU interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584):
    # there, upcast the (already bf16-rounded) operands; their fp32 products are exact, as on GPU.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _load_rows(ptr, row0, idx, idx_ok, width, BLOCK_W: tl.constexpr):
    cols = tl.arange(0, BLOCK_W)
    offs = row0 + idx[:, None].to(tl.int64) * width + cols[None, :]
    return tl.load(ptr + offs, mask=idx_ok[:, None] & (cols[None, :] < width), other=0.0)


@triton.jit
def _score_mse_fwd_kernel(qs_ptr, ks_ptr, qt_ptr, kt_ptr, mask_ptr, partial_ptr, lse_s_ptr,
                          lse_t_ptr, delta_ptr, B, H, T, DS, DT, scale_s, scale_t, n_q_blocks,
                          PROBS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DS: tl.constexpr,
                          BLOCK_DT: tl.constexpr):
    lbh = tl.program_id(0)  # (layer * B + b) * H + h
    q_block = tl.program_id(1)
    b = (lbh // H) % B
    q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < T
    mq = (tl.load(mask_ptr + b * T + q, mask=q_ok, other=0) != 0) & q_ok
    base_s = lbh.to(tl.int64) * T * DS
    base_t = lbh.to(tl.int64) * T * DT
    q_s = _load_rows(qs_ptr, base_s, q, q_ok, DS, BLOCK_DS)
    q_t = _load_rows(qt_ptr, base_t, q, q_ok, DT, BLOCK_DT)
    lse_s = tl.zeros([BLOCK_Q], dtype=tl.float32)
    lse_t = tl.zeros([BLOCK_Q], dtype=tl.float32)
    if PROBS:
        # Pass 1: online log-sum-exp over the valid keys of each row, student and teacher.
        max_s = tl.full([BLOCK_Q], -1e30, dtype=tl.float32)
        max_t = tl.full([BLOCK_Q], -1e30, dtype=tl.float32)
        sum_s = tl.zeros([BLOCK_Q], dtype=tl.float32)
        sum_t = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for k0 in range(0, T, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < T
            mk = (tl.load(mask_ptr + b * T + k, mask=k_ok, other=0) != 0) & k_ok
            k_s = _load_rows(ks_ptr, base_s, k, k_ok, DS, BLOCK_DS)
            k_t = _load_rows(kt_ptr, base_t, k, k_ok, DT, BLOCK_DT)
            sc_s = _dot(q_s, tl.trans(k_s), PRECISION, UPCAST) * scale_s
            sc_t = _dot(q_t, tl.trans(k_t), PRECISION, UPCAST) * scale_t
            sc_s = tl.where(mk[None, :], sc_s, -1e30)
            sc_t = tl.where(mk[None, :], sc_t, -1e30)
            new_s = tl.maximum(max_s, tl.max(sc_s, axis=1))
            new_t = tl.maximum(max_t, tl.max(sc_t, axis=1))
            e_s = tl.where(mk[None, :], tl.exp(sc_s - new_s[:, None]), 0.0)
            e_t = tl.where(mk[None, :], tl.exp(sc_t - new_t[:, None]), 0.0)
            sum_s = sum_s * tl.exp(max_s - new_s) + tl.sum(e_s, axis=1)
            sum_t = sum_t * tl.exp(max_t - new_t) + tl.sum(e_t, axis=1)
            max_s = new_s
            max_t = new_t
        lse_s = tl.where(sum_s > 0, max_s + tl.log(tl.maximum(sum_s, 1e-30)), 0.0)
        lse_t = tl.where(sum_t > 0, max_t + tl.log(tl.maximum(sum_t, 1e-30)), 0.0)
    # Pass 2: squared differences over the counted entries (and delta for the probs backward).
    acc = tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32)
    delta = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for k0 in range(0, T, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < T
        mk = (tl.load(mask_ptr + b * T + k, mask=k_ok, other=0) != 0) & k_ok
        k_s = _load_rows(ks_ptr, base_s, k, k_ok, DS, BLOCK_DS)
        k_t = _load_rows(kt_ptr, base_t, k, k_ok, DT, BLOCK_DT)
        x_s = _dot(q_s, tl.trans(k_s), PRECISION, UPCAST) * scale_s
        x_t = _dot(q_t, tl.trans(k_t), PRECISION, UPCAST) * scale_t
        valid = mq[:, None] & mk[None, :]
        if PROBS:
            x_s = tl.exp(tl.where(valid, x_s - lse_s[:, None], -1e30))
            x_t = tl.exp(tl.where(valid, x_t - lse_t[:, None], -1e30))
        diff = tl.where(valid, x_s - x_t, 0.0)
        acc += diff * diff
        if PROBS:
            delta += tl.sum(diff * x_s, axis=1)
    tl.store(partial_ptr + lbh * n_q_blocks + q_block, tl.sum(tl.sum(acc, axis=1), axis=0))
    if PROBS:
        rows = lbh.to(tl.int64) * T + q
        tl.store(lse_s_ptr + rows, lse_s, mask=q_ok)
        tl.store(lse_t_ptr + rows, lse_t, mask=q_ok)
        tl.store(delta_ptr + rows, delta, mask=q_ok)


@triton.jit
def _score_mse_bwd_kernel(as_ptr, bs_ptr, at_ptr, bt_ptr, mask_ptr, grad_loss_ptr, denom_ptr,
                          lse_s_ptr, lse_t_ptr, delta_ptr, da_ptr, B, H, T, DS, DT, scale_s,
                          scale_t, A_IS_QUERY: tl.constexpr, PROBS: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_A: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):
    """dA_s = sum_b dS[a, b] B_s[b] * scale_s, the program owning a block of A's rows.

    (A, B) = (Q, K) gives dQ_s with dS as is; (A, B) = (K, Q) gives dK_s, the tiles then being
    the transposed scores S^T = K Q^T (the masked elementwise terms are symmetric in form).
    """
    lbh = tl.program_id(0)
    a_block = tl.program_id(1)
    layer = lbh // (B * H)
    b = (lbh // H) % B
    coef = 2.0 * tl.load(grad_loss_ptr + layer) / tl.load(denom_ptr)
    a = a_block * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = a < T
    ma = (tl.load(mask_ptr + b * T + a, mask=a_ok, other=0) != 0) & a_ok
    base_s = lbh.to(tl.int64) * T * DS
    base_t = lbh.to(tl.int64) * T * DT
    a_s = _load_rows(as_ptr, base_s, a, a_ok, DS, BLOCK_DS)
    a_t = _load_rows(at_ptr, base_t, a, a_ok, DT, BLOCK_DT)
    if PROBS:
        if A_IS_QUERY:  # nested, not `and`: both stay compile-time branches
            rows = lbh.to(tl.int64) * T + a
            lse_s_a = tl.load(lse_s_ptr + rows, mask=a_ok, other=0.0)
            lse_t_a = tl.load(lse_t_ptr + rows, mask=a_ok, other=0.0)
            delta_a = tl.load(delta_ptr + rows, mask=a_ok, other=0.0)
    acc = tl.zeros([BLOCK_A, BLOCK_DS], dtype=tl.float32)
    for b0 in range(0, T, BLOCK_B):
        bi = b0 + tl.arange(0, BLOCK_B)
        b_ok = bi < T
        mb = (tl.load(mask_ptr + b * T + bi, mask=b_ok, other=0) != 0) & b_ok
        b_s = _load_rows(bs_ptr, base_s, bi, b_ok, DS, BLOCK_DS)
        b_t = _load_rows(bt_ptr, base_t, bi, b_ok, DT, BLOCK_DT)
        x_s = _dot(a_s, tl.trans(b_s), PRECISION, UPCAST) * scale_s
        x_t = _dot(a_t, tl.trans(b_t), PRECISION, UPCAST) * scale_t
        valid = ma[:, None] & mb[None, :]
        if PROBS:
            if A_IS_QUERY:
                p_s = tl.exp(tl.where(valid, x_s - lse_s_a[:, None], -1e30))
                p_t = tl.exp(tl.where(valid, x_t - lse_t_a[:, None], -1e30))
                row_delta = delta_a[:, None]
            else:
                rows = lbh.to(tl.int64) * T + bi
                lse_s_b = tl.load(lse_s_ptr + rows, mask=b_ok, other=0.0)
                lse_t_b = tl.load(lse_t_ptr + rows, mask=b_ok, other=0.0)
                delta_b = tl.load(delta_ptr + rows, mask=b_ok, other=0.0)
                p_s = tl.exp(tl.where(valid, x_s - lse_s_b[None, :], -1e30))
                p_t = tl.exp(tl.where(valid, x_t - lse_t_b[None, :], -1e30))
                row_delta = delta_b[None, :]
            # Softmax backward: dS = P_s * (dP - sum_k dP P_s), with dP = coef * (P_s - P_t).
            d_score = tl.where(valid, p_s * (coef * (p_s - p_t) - coef * row_delta), 0.0)
        else:
            d_score = tl.where(valid, x_s - x_t, 0.0) * coef
        acc += _dot(d_score.to(b_s.dtype), b_s, PRECISION, UPCAST)
    _store_rows(da_ptr, base_s, a, a_ok, DS, acc * scale_s, BLOCK_DS)


@triton.jit
def _store_rows(ptr, row0, idx, idx_ok, width, value, BLOCK_W: tl.constexpr):
    cols = tl.arange(0, BLOCK_W)
    offs = row0 + idx[:, None].to(tl.int64) * width + cols[None, :]
    tl.store(ptr + offs, value, mask=idx_ok[:, None] & (cols[None, :] < width))


# ---------------------------------------------------------------------------------------------
# Host launchers, registered as custom ops (opaque to torch.compile, with fake implementations).
# ---------------------------------------------------------------------------------------------
def _check_map(a_s, a_t, mask):
    if a_s.dim() != 5 or a_s.shape != a_t.shape or a_s.shape[-1] != a_s.shape[-2]:
        raise ValueError(f"attention_map_mse: maps must both be [L, B, H, T, T]; got "
                         f"{tuple(a_s.shape)} and {tuple(a_t.shape)}")
    if tuple(mask.shape) != (a_s.shape[1], a_s.shape[3]):
        raise ValueError(f"attention_map_mse: mask must be [B, T] = "
                         f"{(a_s.shape[1], a_s.shape[3])}; got {tuple(mask.shape)}")


def map_mse_config(L: int, B: int, H: int, T: int, dtype: torch.dtype) -> LaunchConfig:
    """Launch config for [L, B, H, T, T] maps (pure: the AOT report calls it too)."""
    block_k = min(max(next_power_of_2(T), 16), 128)
    block_q = max(1, min(next_power_of_2(T), 4096 // block_k))
    return LaunchConfig(grid=(L, B * H, cdiv(T, block_q)), num_warps=4, num_stages=3,
                        constexprs=dict(BLOCK_Q=block_q, BLOCK_K=block_k))


def _attention_map_mse_fwd_impl(a_s: torch.Tensor, a_t: torch.Tensor,
                                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss [L] fp32, d loss / d a_s [L, B, H, T, T] in a_s's dtype)."""
    _check_map(a_s, a_t, mask)
    L, B, H, T, _ = a_s.shape
    a_s, a_t = a_s.contiguous(), a_t.contiguous()
    valid = mask.to(torch.int32).contiguous()
    config = map_mse_config(L, B, H, T, a_s.dtype)
    n_q = config.grid[2]
    grad = torch.empty_like(a_s)
    partial = torch.zeros(L, max(B * H * n_q, 1), dtype=torch.float32, device=a_s.device)
    denom = _att_denominator(valid, H).to(torch.float32).reshape(1)
    if L and B * H and n_q:
        launch(_map_mse_kernel, config, a_s, a_t, valid, grad, partial, denom, B * H, H, T, n_q)
    return partial.sum(dim=1) / denom, grad


_attention_map_mse_fwd = torch.library.custom_op(
    "xlmr_mini::attention_map_mse_fwd", _attention_map_mse_fwd_impl, mutates_args=())


@_attention_map_mse_fwd.register_fake
def _(a_s, a_t, mask):
    _check_map(a_s, a_t, mask)
    return a_s.new_empty(a_s.shape[0], dtype=torch.float32), a_s.new_empty(a_s.shape)


def _check_qk(q_s, k_s, q_t, k_t, mask):
    if q_s.dim() != 5 or q_s.shape != k_s.shape or q_t.shape != k_t.shape \
            or q_s.shape[:4] != q_t.shape[:4]:
        raise ValueError("attention_score_mse: q_s, k_s must be [L, B, H, T, d_s] and q_t, k_t "
                         f"[L, B, H, T, d_t]; got {tuple(q_s.shape)}, {tuple(k_s.shape)}, "
                         f"{tuple(q_t.shape)}, {tuple(k_t.shape)}")
    if tuple(mask.shape) != (q_s.shape[1], q_s.shape[3]):
        raise ValueError(f"attention_score_mse: mask must be [B, T] = "
                         f"{(q_s.shape[1], q_s.shape[3])}; got {tuple(mask.shape)}")


def upcast_dots(dtypes, interpreted: bool) -> bool:
    """Whether `tl.dot` upcasts 16-bit operands: under Triton's interpreter only, wherever the
    tensors live (its bf16 dot is broken; a compiled GPU kernel must keep its bf16 dots)."""
    return interpreted and any(dt != torch.float32 for dt in dtypes)


def score_mse_config(L: int, B: int, H: int, T: int, d_s: int, d_t: int, dtypes, probs: bool,
                     part: str, interpreted: bool = False) -> LaunchConfig:
    """Launch config of one Q/K kernel (pure: the AOT report calls it too). `dtypes` are the
    student's and the teacher's; `part` is "fwd", or "dq" / "dk" for the two backward launches."""
    # Tiles of 32 owned rows x 64 looped rows (fewer at small T). 64 x 64 tiles spilled: up to
    # 13 KB of stack per thread in fp32 on sm_80, 24 B in bf16 (bench/RESULTS.md, before/after).
    block_loop = min(max(next_power_of_2(T), 16), 64)
    block_own = min(block_loop, 32)
    fp32 = dtypes[0] == torch.float32
    # IEEE fp32 dots for fp32 students: they run on the FMA units, so each thread holds more of
    # the operands than on tensor cores; 8 warps share a 32 x 32 or 32 x 64 tile (4 warps spilled
    # 8-32 B at 32 x 32), and one stage (T <= 128 makes at most two key blocks to overlap) keeps
    # shared memory at 48 KB or less. bf16 dots run on tensor cores: 4 warps, two stages. TF32
    # would cost ~1e-3 relative error, beyond what the fp32 path is tested to. The probabilities
    # forward holds the log-sum-exp pass's state too: with 64-key tiles at two stages it spilled
    # 24 B per thread in bf16 on sm_80 under Triton 3.6 (168 registers; 3.9: 143, none), so those
    # tiles take one stage, spill-free under both, at little cost: T <= 128 makes at most two key
    # blocks to overlap. Smaller tiles keep two (one stage spilled 8 B on sm_90 under 3.9 at T 32).
    meta = dict(PRECISION="ieee" if fp32 else "tf32", UPCAST=upcast_dots(dtypes, interpreted),
                PROBS=probs, BLOCK_DS=max(next_power_of_2(d_s), 16),
                BLOCK_DT=max(next_power_of_2(d_t), 16))
    if part == "fwd":
        meta.update(BLOCK_Q=block_own, BLOCK_K=block_loop)
    else:
        meta.update(A_IS_QUERY=part == "dq", BLOCK_A=block_own, BLOCK_B=block_loop)
    big_fp32 = fp32 and block_own * block_loop >= 1024
    one_stage = fp32 or (probs and part == "fwd" and block_loop == 64)
    return LaunchConfig(grid=(L * B * H, cdiv(T, block_own)), num_warps=8 if big_fp32 else 4,
                        num_stages=1 if one_stage else 2, constexprs=meta)


def _qk_config(q_s, q_t, probs, part):
    L, B, H, T, d_s = q_s.shape
    return score_mse_config(L, B, H, T, d_s, q_t.shape[-1], (q_s.dtype, q_t.dtype), probs, part,
                            interpreting())


def _attention_score_mse_fwd_impl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor,
                                  k_t: torch.Tensor, mask: torch.Tensor, probs: bool,
                                  token_pairs: torch.Tensor | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss [L] fp32, lse_s, lse_t, delta); the last three are [L, B, H, T] fp32 when
    `probs`, else empty. `token_pairs` as in `attention_map_mse_reference`."""
    _check_qk(q_s, k_s, q_t, k_t, mask)
    L, B, H, T, d_s = q_s.shape
    d_t = q_t.shape[-1]
    q_s, k_s, q_t, k_t = (x.contiguous() for x in (q_s, k_s, q_t, k_t))
    valid = mask.to(torch.int32).contiguous()
    config = _qk_config(q_s, q_t, probs, "fwd")
    n_q = config.grid[1]
    partial = torch.zeros(L, max(B * H * n_q, 1), dtype=torch.float32, device=q_s.device)
    rows = (L, B, H, T) if probs else (0,)
    lse_s, lse_t, delta = (torch.zeros(rows, dtype=torch.float32, device=q_s.device)
                           for _ in range(3))
    if L * B * H and n_q:
        launch(_score_mse_fwd_kernel, config, q_s, k_s, q_t, k_t, valid, partial, lse_s, lse_t,
               delta, B, H, T, d_s, d_t, 1 / math.sqrt(d_s), 1 / math.sqrt(d_t), n_q)
    return partial.sum(dim=1) / _att_denominator(valid, H, token_pairs), lse_s, lse_t, delta


_attention_score_mse_fwd = torch.library.custom_op(
    "xlmr_mini::attention_score_mse_fwd", _attention_score_mse_fwd_impl, mutates_args=())


@_attention_score_mse_fwd.register_fake
def _(q_s, k_s, q_t, k_t, mask, probs, token_pairs=None):
    _check_qk(q_s, k_s, q_t, k_t, mask)
    rows = tuple(q_s.shape[:4]) if probs else (0,)
    return (q_s.new_empty(q_s.shape[0], dtype=torch.float32),
            *(q_s.new_empty(rows, dtype=torch.float32) for _ in range(3)))


def _attention_score_mse_bwd_impl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor,
                                  k_t: torch.Tensor, mask: torch.Tensor, grad_loss: torch.Tensor,
                                  lse_s: torch.Tensor, lse_t: torch.Tensor, delta: torch.Tensor,
                                  probs: bool, token_pairs: torch.Tensor | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dq_s, dk_s), recomputing the score tiles; `grad_loss` is d out / d loss [L]."""
    L, B, H, T, d_s = q_s.shape
    d_t = q_t.shape[-1]
    q_s, k_s, q_t, k_t = (x.contiguous() for x in (q_s, k_s, q_t, k_t))
    valid = mask.to(torch.int32).contiguous()
    grad_loss = grad_loss.to(torch.float32).contiguous()
    denom = _att_denominator(valid, H, token_pairs).to(torch.float32).reshape(1)
    dq_s, dk_s = torch.empty_like(q_s), torch.empty_like(k_s)
    if not (L * B * H and T):
        return dq_s.zero_(), dk_s.zero_()
    for part, (a_s, b_s, a_t, b_t, out) in (("dq", (q_s, k_s, q_t, k_t, dq_s)),
                                            ("dk", (k_s, q_s, k_t, q_t, dk_s))):
        launch(_score_mse_bwd_kernel, _qk_config(q_s, q_t, probs, part), a_s, b_s, a_t, b_t,
               valid, grad_loss, denom, lse_s, lse_t, delta, out, B, H, T, d_s, d_t,
               1 / math.sqrt(d_s), 1 / math.sqrt(d_t))
    return dq_s, dk_s


_attention_score_mse_bwd = torch.library.custom_op(
    "xlmr_mini::attention_score_mse_bwd", _attention_score_mse_bwd_impl, mutates_args=())


@_attention_score_mse_bwd.register_fake
def _(q_s, k_s, q_t, k_t, mask, grad_loss, lse_s, lse_t, delta, probs, token_pairs=None):
    return q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)  # contiguous, as the real op's


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------
class AttentionMapMSEFunction(torch.autograd.Function):
    """The gradient is made in the forward pass; backward only scales it per layer."""

    @staticmethod
    def forward(ctx, a_s, a_t, mask):
        loss, grad = torch.ops.xlmr_mini.attention_map_mse_fwd(a_s, a_t, mask)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype)[:, None, None, None, None], None, None


class AttentionScoreMSEFunction(torch.autograd.Function):
    """Forward keeps Q, K (and per-row softmax statistics); backward recomputes score tiles."""

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, mask, probs, token_pairs=None):
        loss, lse_s, lse_t, delta = torch.ops.xlmr_mini.attention_score_mse_fwd(
            q_s, k_s, q_t, k_t, mask, probs, token_pairs)
        ctx.save_for_backward(q_s, k_s, q_t, k_t, mask, lse_s, lse_t, delta, token_pairs)
        ctx.probs = probs
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        q_s, k_s, q_t, k_t, mask, lse_s, lse_t, delta, token_pairs = ctx.saved_tensors
        dq_s, dk_s = torch.ops.xlmr_mini.attention_score_mse_bwd(
            q_s, k_s, q_t, k_t, mask, grad_loss, lse_s, lse_t, delta, ctx.probs, token_pairs)
        return dq_s, dk_s, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Functional aliases: fused Triton where available, else the reference.
# ---------------------------------------------------------------------------------------------
def attention_map_mse(a_s: torch.Tensor, a_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked L_att on materialized [L, B, H, T, T] maps -> [L] fp32."""
    if use_triton(a_s):
        return AttentionMapMSEFunction.apply(a_s, a_t, mask)
    return attention_map_mse_reference(a_s, a_t, mask)


def attention_score_mse(q_s, k_s, q_t, k_t, mask, token_pairs=None) -> torch.Tensor:
    """Masked L_att on pre-softmax scores from [L, B, H, T, d] queries and keys -> [L] fp32;
    `token_pairs`: sum_b n_b^2 to divide by (the global batch's under data parallelism)."""
    if use_triton(q_s):
        return AttentionScoreMSEFunction.apply(q_s, k_s, q_t, k_t, mask, False, token_pairs)
    return attention_score_mse_reference(q_s, k_s, q_t, k_t, mask, token_pairs=token_pairs)


def attention_prob_mse(q_s, k_s, q_t, k_t, mask, token_pairs=None) -> torch.Tensor:
    """Masked L_att on attention probabilities from [L, B, H, T, d] queries and keys -> [L] fp32;
    `token_pairs` as in `attention_score_mse`."""
    if use_triton(q_s):
        return AttentionScoreMSEFunction.apply(q_s, k_s, q_t, k_t, mask, True, token_pairs)
    return attention_prob_mse_reference(q_s, k_s, q_t, k_t, mask, token_pairs=token_pairs)
