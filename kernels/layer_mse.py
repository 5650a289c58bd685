"""Masked multi-layer hidden-state MSE (TinyBERT's L_hidn and L_embd), fused in one Triton launch.

Scope: `student` and `teacher` are [L, B, T, D] stacks of L layers' hidden states (the embedding
output is the case L = 1) of the same width D (a width projection is the caller's, applied before);
`mask` is [B, T] (bool or 0/1 int), True/1 for valid (non-pad) tokens, shared by both models.

Definition, per layer l, with n = number of valid tokens:

    loss[l] = sum_{b,t valid} sum_d (student[l,b,t,d] - teacher[l,b,t,d])^2 / (n * D)

Pad positions are excluded with `torch.where`, so whatever they hold (even inf) never reaches the
loss. A batch with no valid token gives loss 0 (the denominator is clamped to 1), not NaN.
`tokens` replaces n by another count, e.g. the global batch's when each data-parallel rank holds a
share of it (the loss is then the rank's part of the global one).

Kernel: one launch over (layer, block of tokens); each program sums its squared differences in
fp32 into its own slot of a partial-sum buffer, which is then summed in a fixed order, so the result
is bit-reproducible (no atomics). The same pass writes d loss[l] / d student (Liger-style); backward
only scales it by grad_output[l]. Inputs fp32 or bf16 (fp16 works too); accumulation and the loss
are fp32; the gradient has the student's dtype. The teacher is a constant target: it never gets a
gradient. The saved gradient costs one student-sized tensor until backward.

Dispatch: Triton on CUDA tensors or under TRITON_INTERPRET=1, else `layer_mse_reference`.

Hardware: correctness checked on CPU through the interpreter only. Compiled ahead of time for
sm_80 (A100) and sm_90 (H100) with Triton 3.9 (`python -m bench.kernels_aot`): at the tiles
`layer_mse_config` picks, no spills, 6 or more blocks per SM. GPU speed not yet measured.
"""
import torch

from ._dispatch import LaunchConfig, cdiv, launch, next_power_of_2, tl, triton, use_triton


# ---------------------------------------------------------------------------------------------
# Reference: the definition, and what tests and benchmarks compare against.
# ---------------------------------------------------------------------------------------------
def layer_mse_reference(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                        upcast: bool = True, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """[L, B, T, D] x2, mask [B, T] -> [L]; fp32 if `upcast`, else in the inputs' dtype.

    `tokens`: the real-token count to divide by instead of this batch's, e.g. the global batch's
    when each data-parallel rank holds a share of it (the result is then the rank's part of the loss)."""
    if upcast:
        student, teacher = student.float(), teacher.float()
    valid = mask.bool()[None, :, :, None]  # [1, B, T, 1]
    diff = torch.where(valid, student - teacher, 0.0)  # where, not * mask: pads may hold inf
    denom = (mask.bool().sum() if tokens is None else tokens).clamp(min=1) * student.shape[-1]
    return diff.square().sum(dim=(1, 2, 3)) / denom


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _layer_mse_kernel(s_ptr, t_ptr, mask_ptr, grad_ptr, partial_ptr, denom_ptr, N, D, n_blocks,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    layer = tl.program_id(0)
    block = tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    valid = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
    two_over_denom = 2.0 / tl.load(denom_ptr)
    base = layer.to(tl.int64) * N * D
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_bounds = row_ok[:, None] & (cols[None, :] < D)
        offs = base + rows[:, None].to(tl.int64) * D + cols[None, :]
        s = tl.load(s_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        diff = tl.where(valid[:, None] & in_bounds, s - t, 0.0)
        acc += diff * diff
        tl.store(grad_ptr + offs, diff * two_over_denom, mask=in_bounds)
    tl.store(partial_ptr + layer * n_blocks + block, tl.sum(tl.sum(acc, axis=1), axis=0))


# ---------------------------------------------------------------------------------------------
# Host launcher, registered as a forward-only custom op so torch.compile treats it as opaque.
# ---------------------------------------------------------------------------------------------
def _check(student, teacher, mask):
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(f"layer_mse: student and teacher must both be [L, B, T, D]; got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if tuple(mask.shape) != tuple(student.shape[1:3]):
        raise ValueError(f"layer_mse: mask must be [B, T] = {tuple(student.shape[1:3])}; "
                         f"got {tuple(mask.shape)}")


def layer_mse_config(L: int, N: int, D: int, dtype: torch.dtype) -> LaunchConfig:
    """Launch config for L layers of N tokens of width D (pure: the AOT report calls it too)."""
    # 2,048-element tiles (16 per thread at 4 warps) at most 256 wide: 72-76 registers in fp32,
    # 6-7 blocks per SM on sm_80 / sm_90, no spills (4,096-element 4 x 1,024 tiles needed ~100
    # and left a quarter of each row masked at D = 768). See `python -m bench.kernels_aot`.
    block_d = min(next_power_of_2(D), 256)
    block_n = 2048 // block_d
    return LaunchConfig(grid=(L, cdiv(N, block_n)), num_warps=4, num_stages=3,
                        constexprs=dict(BLOCK_N=block_n, BLOCK_D=block_d))


def _layer_mse_fwd_impl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                        tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss [L] fp32, d loss / d student [L, B, T, D] in the student's dtype); `tokens`
    as in `layer_mse_reference`."""
    _check(student, teacher, mask)
    L, B, T, D = student.shape
    student, teacher = student.contiguous(), teacher.contiguous()
    valid = mask.reshape(-1).to(torch.int32).contiguous()
    config = layer_mse_config(L, B * T, D, student.dtype)
    n_blocks = config.grid[1]
    grad = torch.empty_like(student)
    partial = torch.zeros(L, max(n_blocks, 1), dtype=torch.float32, device=student.device)
    denom = ((valid.sum() if tokens is None else tokens).clamp(min=1) * D).to(torch.float32).reshape(1)
    if L and n_blocks:
        launch(_layer_mse_kernel, config, student, teacher, valid, grad, partial, denom, B * T, D,
               n_blocks)
    return partial.sum(dim=1) / denom, grad


_layer_mse_fwd = torch.library.custom_op("xlmr_mini::layer_mse_fwd", _layer_mse_fwd_impl,
                                         mutates_args=())


@_layer_mse_fwd.register_fake
def _(student, teacher, mask, tokens=None):
    _check(student, teacher, mask)
    loss = student.new_empty(student.shape[0], dtype=torch.float32)
    return loss, student.new_empty(student.shape)  # contiguous, as the real op's


# ---------------------------------------------------------------------------------------------
# Autograd: the gradient was made in the forward pass; backward only scales it per layer.
# ---------------------------------------------------------------------------------------------
class LayerMSEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, mask, tokens=None):
        loss, grad = torch.ops.xlmr_mini.layer_mse_fwd(student, teacher, mask, tokens)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype)[:, None, None, None], None, None, None


def layer_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
              tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Masked per-layer MSE [L] (fp32); fused Triton where available, else the reference.
    `tokens`: the real-token count to divide by (the global batch's under data parallelism)."""
    if use_triton(student):
        return LayerMSEFunction.apply(student, teacher, mask, tokens)
    return layer_mse_reference(student, teacher, mask, tokens=tokens)
