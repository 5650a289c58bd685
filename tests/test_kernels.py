"""Fused KD-loss kernels against their references: values, gradients, bf16 error, determinism,
the CPU fallback, and a torch.compile'd train step.

Without CUDA the Triton kernels run through Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before triton is imported, only when CUDA is absent); on a CUDA machine the same
tests run the compiled kernels on tensors moved there (DEVICE below).
"""
import math

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from xlmr_mini.kernels import _dispatch
from xlmr_mini.kernels.attention_kd import (
    AttentionMapMSEFunction,
    AttentionScoreMSEFunction,
    _attention_score_mse_fwd_impl,
    attention_map_mse,
    attention_map_mse_reference,
    attention_prob_mse,
    attention_prob_mse_reference,
    attention_score_mse,
    attention_score_mse_reference,
    attention_scores,
)
from xlmr_mini.kernels.layer_mse import LayerMSEFunction, layer_mse, layer_mse_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not _dispatch.HAS_TRITON or (DEVICE == "cpu" and not _dispatch.interpreting()),
    reason="triton is not importable (or TRITON_INTERPRET is not 1 on a CPU-only machine)")

# (dtype, atol, rtol); atol is relative to the largest magnitude of the expected tensor.
FP32_TOL = (torch.float32, 1e-5, 1e-5)
BF16_FACTOR = 2.0  # kernel error vs fp32 reference <= 2x plain PyTorch bf16's error (+ tiny floor)


def _mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # [B, T] bool


def _assert_close(actual, expected, tol=FP32_TOL):
    dtype, atol, rtol = tol
    assert actual.dtype == dtype, (actual.dtype, dtype)
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


# Each alias and the autograd Function its kernel path runs through.
KERNEL_PATHS = {layer_mse: LayerMSEFunction, attention_map_mse: AttentionMapMSEFunction,
                attention_score_mse: AttentionScoreMSEFunction,
                attention_prob_mse: AttentionScoreMSEFunction}


def _loss_and_grads(fn, leaves, consts, mask, g, **kw):
    """Run fn(*leaves, *consts, mask), backprop sum(loss * g); return (loss, grads of leaves).

    For a kernel alias, first assert that its kernel ran: an alias that fell back to its
    reference would otherwise be compared with that same reference and pass."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    loss = fn(*leaves, *consts, mask, **kw)
    if fn in KERNEL_PATHS:
        expected = KERNEL_PATHS[fn].__name__ + "Backward"
        assert loss.grad_fn.name() == expected, (fn.__name__, loss.grad_fn.name())
    loss.backward(g)
    return loss.detach(), [x.grad for x in leaves]


def _grad_weights(kind, L):
    if kind == "ones":
        return torch.ones(L, device=DEVICE)
    return torch.rand(L, generator=torch.Generator().manual_seed(L)).to(DEVICE) * 2 - 0.5


def _hidden_inputs(L, lengths, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = (torch.randn(L, len(lengths), T, D, generator=g) for _ in range(2))
    return s.to(DEVICE, dtype), t.to(DEVICE, dtype), _mask(lengths, T).to(DEVICE)


def _qk_inputs(L, lengths, H, T, d_s, d_t, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    q_s, k_s = (torch.randn(L, B, H, T, d_s, generator=g) for _ in range(2))
    q_t, k_t = (torch.randn(L, B, H, T, d_t, generator=g) * 1.3 for _ in range(2))
    return [x.to(DEVICE, dtype) for x in (q_s, k_s, q_t, k_t)] + [_mask(lengths, T).to(DEVICE)]


def _map_inputs(L, lengths, H, T, dtype=torch.float32, seed=0, fill=-math.inf):
    """Score maps with `fill` at masked keys, as a model's masked attention scores hold."""
    q_s, k_s, q_t, k_t, mask = _qk_inputs(L, lengths, H, T, 8, 16, seed=seed)
    key_ok = mask[None, :, None, None, :]
    a_s = torch.where(key_ok, attention_scores(q_s, k_s), fill)
    a_t = torch.where(key_ok, attention_scores(q_t, k_t), fill)
    return a_s.to(dtype), a_t.to(dtype), mask


# ---------------------------------------------------------------------------------------------
# The references, on numbers worked out by hand
# ---------------------------------------------------------------------------------------------
def test_layer_mse_reference_by_hand():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 1.0], [5.0, 5.0]]]])  # [2, 1, 2, 2]
    t = torch.zeros_like(s)
    t[:, :, 1] = math.inf  # the pad token may hold anything
    mask = torch.tensor([[1, 0]])
    # layer 0: (1 + 4) / (1 token * 2 dims); layer 1: (0 + 1) / 2
    torch.testing.assert_close(layer_mse_reference(s, t, mask), torch.tensor([2.5, 0.5]))
    both = torch.tensor([[True, True]])
    t2 = torch.zeros_like(s)
    torch.testing.assert_close(layer_mse_reference(s, t2, both), torch.tensor([7.5, 12.75]))


def test_attention_map_mse_reference_by_hand():
    inf = math.inf
    # B = 2, H = 1, T = 2; sequence 0 has both tokens, sequence 1 one: denominator 1 * (4 + 1).
    a_s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[2.0, -inf], [7.0, -inf]]]])[None]
    a_t = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[0.0, -inf], [-1.0, -inf]]]])[None]
    mask = torch.tensor([[1, 1], [1, 0]])
    a_s.requires_grad_()
    loss = attention_map_mse_reference(a_s, a_t, mask)
    torch.testing.assert_close(loss, torch.tensor([(1 + 4 + 9 + 16 + 4) / 5]))
    loss.sum().backward()
    assert torch.isfinite(a_s.grad).all()  # -inf at masked keys never reaches the gradient
    assert a_s.grad[0, 1, 0, 1, :].eq(0).all() and a_s.grad[0, 1, 0, 0, 0] == 2 * 2 / 5


def test_attention_score_and_prob_references_by_hand():
    # Scores: d_s = 4 (scale 1/2), d_t = 1 (scale 1). T = 1: S_s = 0.5, S_t = 2 * 3 = 6.
    q_s, k_s = torch.ones(1, 1, 1, 1, 4), torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 1, 4)
    q_t, k_t = torch.full((1, 1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1, 1), 3.0)
    mask = torch.ones(1, 1, dtype=torch.bool)
    torch.testing.assert_close(attention_score_mse_reference(q_s, k_s, q_t, k_t, mask),
                               torch.tensor([30.25]))
    # Probabilities, T = 2: the student is uniform (zero queries); the teacher's row 0 scores are
    # [ln 3, 0] -> [0.75, 0.25], row 1 [0, 0] -> uniform. Loss (0.25^2 * 2) / (1 * 2^2).
    q_s, k_s = torch.zeros(1, 1, 1, 2, 4), torch.randn(1, 1, 1, 2, 4)
    q_t = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2, 1)
    k_t = torch.tensor([math.log(3.0), 0.0]).view(1, 1, 1, 2, 1)
    both = torch.ones(1, 2, dtype=torch.bool)
    torch.testing.assert_close(attention_prob_mse_reference(q_s, k_s, q_t, k_t, both),
                               torch.tensor([0.03125]))
    # With key 1 masked, both sides put all mass on key 0: nothing differs.
    one = torch.tensor([[True, False]])
    torch.testing.assert_close(attention_prob_mse_reference(q_s, k_s, q_t, k_t, one),
                               torch.tensor([0.0]))


def test_empty_batch_gives_zero_not_nan():
    s, t, _ = _hidden_inputs(2, [3], 3, 5)
    none = torch.zeros(1, 3, dtype=torch.bool, device=DEVICE)
    torch.testing.assert_close(layer_mse_reference(s, t, none), torch.zeros(2, device=DEVICE))
    a_s, a_t, _ = _map_inputs(1, [3], 2, 3)
    torch.testing.assert_close(attention_map_mse_reference(a_s, a_t, none),
                               torch.zeros(1, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# Kernels vs references, fp32
# ---------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("L, lengths, T, D, g_kind", [
    (1, [1], 1, 384, "ones"),
    (3, [7, 1, 3], 7, 768, "random"),
    (2, [5, 0], 5, 33, "ones"),  # a sequence with no valid token
    (12, [129, 5], 129, 384, "random"),
])
def test_layer_mse_matches_reference(L, lengths, T, D, g_kind):
    s, t, mask = _hidden_inputs(L, lengths, T, D)
    g = _grad_weights(g_kind, L)
    loss, (grad,) = _loss_and_grads(layer_mse, [s], [t], mask, g)
    loss_r, (grad_r,) = _loss_and_grads(layer_mse_reference, [s], [t], mask, g)
    assert loss.shape == (L,)
    _assert_close(loss, loss_r)
    _assert_close(grad, grad_r)
    assert grad[:, ~mask].eq(0).all()


@needs_triton
@pytest.mark.parametrize("L, lengths, H, T, g_kind", [
    (1, [1], 1, 1, "ones"),
    (2, [7, 1, 3], 6, 7, "random"),
    (1, [129, 3], 12, 129, "random"),
    (5, [4], 3, 4, "random"),
])
def test_attention_map_mse_matches_reference(L, lengths, H, T, g_kind):
    a_s, a_t, mask = _map_inputs(L, lengths, H, T)
    g = _grad_weights(g_kind, L)
    loss, (grad,) = _loss_and_grads(attention_map_mse, [a_s], [a_t], mask, g)
    loss_r, (grad_r,) = _loss_and_grads(attention_map_mse_reference, [a_s], [a_t], mask, g)
    _assert_close(loss, loss_r)
    _assert_close(grad, grad_r)
    assert torch.isfinite(grad).all()


QK_CASES = [  # L, lengths, H, T, d_s, d_t, g_kind
    (1, [1], 1, 1, 16, 16, "ones"),
    (2, [7, 1, 3], 6, 7, 16, 32, "random"),  # narrower student heads, heavy padding
    (12, [5], 2, 5, 8, 24, "random"),  # 12 layers, head dims below the 16-wide tile
    (1, [129, 60], 3, 129, 32, 64, "random"),
    (1, [512], 1, 512, 64, 64, "ones"),
    (1, [300], 1, 512, 16, 64, "random"),
]


@needs_triton
@pytest.mark.parametrize("fn, ref", [(attention_score_mse, attention_score_mse_reference),
                                     (attention_prob_mse, attention_prob_mse_reference)],
                         ids=["scores", "probs"])
@pytest.mark.parametrize("L, lengths, H, T, d_s, d_t, g_kind", QK_CASES)
def test_attention_qk_losses_match_reference(fn, ref, L, lengths, H, T, d_s, d_t, g_kind):
    q_s, k_s, q_t, k_t, mask = _qk_inputs(L, lengths, H, T, d_s, d_t)
    g = _grad_weights(g_kind, L)
    loss, grads = _loss_and_grads(fn, [q_s, k_s], [q_t, k_t], mask, g)
    loss_r, grads_r = _loss_and_grads(ref, [q_s, k_s], [q_t, k_t], mask, g)
    _assert_close(loss, loss_r)
    for grad, grad_r in zip(grads, grads_r):
        _assert_close(grad, grad_r)


# ---------------------------------------------------------------------------------------------
# bf16: the kernel's error against fp32 within about 2x of plain PyTorch's in bf16
# ---------------------------------------------------------------------------------------------
def _bf16_check(fn, ref, leaves, consts, mask, g):
    loss32, grads32 = _loss_and_grads(ref, [x.float() for x in leaves],
                                      [x.float() for x in consts], mask, g)
    loss, grads = _loss_and_grads(fn, leaves, consts, mask, g)
    loss_pt, grads_pt = _loss_and_grads(ref, leaves, consts, mask, g, upcast=False)
    assert loss.dtype == torch.float32 and all(x.dtype == torch.bfloat16 for x in grads)
    pairs = [(loss, loss_pt, loss32)] + list(zip(grads, grads_pt, grads32))
    for mine, plain, exact in pairs:
        err = (mine.float() - exact).abs().max().item()
        err_pt = (plain.float() - exact).abs().max().item()
        assert err <= BF16_FACTOR * err_pt + 1e-6 * exact.abs().max().item(), (err, err_pt)


@needs_triton
def test_layer_mse_bf16():
    s, t, mask = _hidden_inputs(3, [9, 2, 5], 9, 768, torch.bfloat16)
    _bf16_check(layer_mse, layer_mse_reference, [s], [t], mask, _grad_weights("random", 3))


@needs_triton
def test_attention_map_mse_bf16():
    a_s, a_t, mask = _map_inputs(2, [33, 7], 4, 33, torch.bfloat16, fill=torch.finfo().min)
    _bf16_check(attention_map_mse, attention_map_mse_reference, [a_s], [a_t], mask,
                _grad_weights("random", 2))


@needs_triton
@pytest.mark.parametrize("fn, ref", [(attention_score_mse, attention_score_mse_reference),
                                     (attention_prob_mse, attention_prob_mse_reference)],
                         ids=["scores", "probs"])
def test_attention_qk_losses_bf16(fn, ref):
    q_s, k_s, q_t, k_t, mask = _qk_inputs(2, [65, 20], 3, 65, 32, 64, torch.bfloat16)
    _bf16_check(fn, ref, [q_s, k_s], [q_t, k_t], mask, _grad_weights("random", 2))


# ---------------------------------------------------------------------------------------------
# Determinism, teacher, errors, fallback
# ---------------------------------------------------------------------------------------------
@needs_triton
def test_kernels_are_bit_reproducible():
    g = _grad_weights("random", 2)
    s, t, mask = _hidden_inputs(2, [9, 4], 9, 100)
    a_s, a_t, mask_a = _map_inputs(2, [9, 4], 3, 9)
    q_s, k_s, q_t, k_t, mask_q = _qk_inputs(2, [40, 17], 2, 40, 16, 32)
    runs = [
        (layer_mse, [s], [t], mask),
        (attention_map_mse, [a_s], [a_t], mask_a),
        (attention_score_mse, [q_s, k_s], [q_t, k_t], mask_q),
        (attention_prob_mse, [q_s, k_s], [q_t, k_t], mask_q),
    ]
    for fn, leaves, consts, m in runs:
        first, second = (_loss_and_grads(fn, leaves, consts, m, g) for _ in range(2))
        assert torch.equal(first[0], second[0]), fn.__name__
        assert all(torch.equal(a, b) for a, b in zip(first[1], second[1])), fn.__name__


@needs_triton
def test_teacher_gets_no_gradient():
    s, t, mask = _hidden_inputs(1, [3], 3, 16)
    s.requires_grad_(), t.requires_grad_()
    layer_mse(s, t, mask).sum().backward()
    assert s.grad is not None and t.grad is None


@needs_triton
def test_shape_errors_name_the_problem():
    s, t, mask = _hidden_inputs(1, [3], 3, 16)
    with pytest.raises(ValueError, match=r"mask must be \[B, T\] = \(1, 3\); got \(1, 4\)"):
        layer_mse(s, t, torch.ones(1, 4, dtype=torch.bool, device=DEVICE))
    q_s, k_s, q_t, k_t, mask = _qk_inputs(1, [3], 2, 3, 16, 16)
    with pytest.raises(ValueError, match="q_s, k_s must be"):
        attention_score_mse(q_s, k_s[..., :8], q_t, k_t, mask)


def test_reference_fallback_without_interpreter(monkeypatch):
    """On CPU without TRITON_INTERPRET=1 every alias runs (and equals) its reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s, t, mask = _hidden_inputs(2, [5, 2], 5, 24)
    s, t = s.cpu(), t.cpu()
    assert not _dispatch.use_triton(s)
    out = layer_mse(s.requires_grad_(), t, mask.cpu())
    assert out.grad_fn.name() != "LayerMSEFunctionBackward"
    torch.testing.assert_close(out, layer_mse_reference(s, t, mask.cpu()), rtol=0, atol=0)
    q_s, k_s, q_t, k_t, mask_q = (x.cpu() for x in _qk_inputs(1, [6, 3], 2, 6, 8, 16))
    for fn, ref in [(attention_score_mse, attention_score_mse_reference),
                    (attention_prob_mse, attention_prob_mse_reference)]:
        torch.testing.assert_close(fn(q_s, k_s, q_t, k_t, mask_q),
                                   ref(q_s, k_s, q_t, k_t, mask_q), rtol=0, atol=0)
    a_s, a_t, mask_a = (x.cpu() for x in _map_inputs(1, [6, 3], 2, 6))  # on a GPU the kernel would run
    assert not _dispatch.use_triton(a_s)
    torch.testing.assert_close(attention_map_mse(a_s, a_t, mask_a),
                               attention_map_mse_reference(a_s, a_t, mask_a), rtol=0, atol=0)


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_bf16_dot_upcast_follows_the_interpreter_not_the_device(monkeypatch, interpret):
    """bf16 operands are upcast before tl.dot under the interpreter (CPU or CUDA tensors alike:
    its bf16 dot is broken), never in a compiled kernel. Meta tensors stand in for CUDA ones."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    q = torch.empty(1, 2, 3, 8, 16, dtype=torch.bfloat16, device="meta")
    mask = torch.ones(2, 8, dtype=torch.bool, device="meta")
    with _dispatch.record_launches() as launches:
        _attention_score_mse_fwd_impl(q, q, q, q, mask, True)
    assert [x.config.constexprs["UPCAST"] for x in launches] == [interpret == "1"]


@needs_triton
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and dynamic shapes of the registered ops."""
    s, t, mask = _hidden_inputs(2, [5, 2], 5, 24)
    torch.library.opcheck(torch.ops.xlmr_mini.layer_mse_fwd.default, (s, t, mask))
    a_s, a_t, mask_a = _map_inputs(1, [6, 3], 2, 6)
    torch.library.opcheck(torch.ops.xlmr_mini.attention_map_mse_fwd.default, (a_s, a_t, mask_a))
    q_s, k_s, q_t, k_t, mask_q = _qk_inputs(1, [6, 3], 2, 6, 8, 16)
    for probs in (False, True):
        fwd = torch.ops.xlmr_mini.attention_score_mse_fwd.default
        torch.library.opcheck(fwd, (q_s, k_s, q_t, k_t, mask_q, probs))
        _, lse_s, lse_t, delta = fwd(q_s, k_s, q_t, k_t, mask_q, probs)
        g = torch.ones(1, device=DEVICE)
        torch.library.opcheck(torch.ops.xlmr_mini.attention_score_mse_bwd.default,
                              (q_s, k_s, q_t, k_t, mask_q, g, lse_s, lse_t, delta, probs))


# ---------------------------------------------------------------------------------------------
# torch.compile: a whole student forward + KD loss with fullgraph=True, then backward and a step
# ---------------------------------------------------------------------------------------------
class _TinyStudent(torch.nn.Module):
    """Produces KD taps from an input: hidden [L, B, T, D], Q and K [L, B, H, T, d]."""

    def __init__(self, L=2, H=2, d=16, D=24, width=8):
        super().__init__()
        self.shape = (L, H, d, D)
        self.hidden = torch.nn.Linear(width, L * D)
        self.q = torch.nn.Linear(width, L * H * d)
        self.k = torch.nn.Linear(width, L * H * d)

    def forward(self, x):  # x: [B, T, width]
        L, H, d, D = self.shape
        B, T, _ = x.shape
        hidden = self.hidden(x).view(B, T, L, D).permute(2, 0, 1, 3)  # [L, B, T, D]
        q = self.q(x).view(B, T, L, H, d).permute(2, 0, 3, 1, 4)  # [L, B, H, T, d]
        k = self.k(x).view(B, T, L, H, d).permute(2, 0, 3, 1, 4)
        return hidden, q, k


def _kd_step_loss(model, x, teacher, mask, fused: bool):
    hidden, q, k = model(x)
    h_t, q_t, k_t = teacher
    if fused:
        fns = layer_mse, attention_score_mse, attention_prob_mse, attention_map_mse
    else:
        fns = (layer_mse_reference, attention_score_mse_reference, attention_prob_mse_reference,
               attention_map_mse_reference)
    maps = attention_scores(q, k), attention_scores(q_t, k_t)
    return (fns[0](hidden, h_t, mask).sum() + fns[1](q, k, q_t, k_t, mask).sum()
            + 0.5 * fns[2](q, k, q_t, k_t, mask).sum() + fns[3](*maps, mask).sum())


def _train_step(loss_fn, model, opt, *args):
    loss = loss_fn(model, *args)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    opt.zero_grad()
    return loss.detach(), grads


@needs_triton
def test_compiled_train_step_fullgraph_matches_eager_reference():
    """On CPU this compiles the graph around the custom ops and runs the kernels interpreted."""
    torch.manual_seed(0)
    B, T, L, H, d, D = 3, 9, 2, 2, 16, 24
    x = torch.randn(B, T, 8, device=DEVICE)
    mask = _mask([9, 2, 5], T).to(DEVICE)
    teacher = (torch.randn(L, B, T, D, device=DEVICE), torch.randn(L, B, H, T, d, device=DEVICE),
               torch.randn(L, B, H, T, d, device=DEVICE))
    eager, compiled = _TinyStudent().to(DEVICE), _TinyStudent().to(DEVICE)
    compiled.load_state_dict(eager.state_dict())
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.1)
    torch._dynamo.reset()
    step = torch.compile(_kd_step_loss, fullgraph=True)
    for i in range(2):  # the second step runs the cached graph on updated weights
        loss_e, grads_e = _train_step(_kd_step_loss, eager, opt_e, x, teacher, mask, False)
        if i == 0:  # the compiled forward and backward call the kernels' ops, not the references
            (loss_c, grads_c), code = run_and_get_code(
                _train_step, step, compiled, opt_c, x, teacher, mask, True)
            code = "\n".join(code)
            for op in ("layer_mse_fwd", "attention_map_mse_fwd", "attention_score_mse_fwd",
                       "attention_score_mse_bwd"):
                assert f"xlmr_mini.{op}" in code, op
        else:
            loss_c, grads_c = _train_step(step, compiled, opt_c, x, teacher, mask, True)
        _assert_close(loss_c, loss_e)
        for g_c, g_e in zip(grads_c, grads_e):
            _assert_close(g_c, g_e)
