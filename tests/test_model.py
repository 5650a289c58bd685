"""The native encoder against transformers: logits, hidden states, attentions, gradients, bf16."""
import math
import unittest.mock

import pytest
import torch
from conftest import hf_classifier, padded_batch

from xlmr_mini.checkpoint import build_model, canonical_key, native_to_hf
from xlmr_mini.config import XLMRConfig
from xlmr_mini.model import Taps, position_ids

FP32_ATOL = 1e-5


def native_from(hf):
    cfg = XLMRConfig.from_hf_dict(hf.config.to_dict())
    state = {canonical_key(k): v for k, v in hf.state_dict().items()}
    return build_model(cfg, state).eval()


def run_both(hf, ours, ids, mask):
    all_layers = tuple(range(ours.cfg.num_hidden_layers))
    ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    out = ours(ids, mask, taps=Taps(layers=all_layers, embeddings=True, hidden=True, scores=True, probs=True))
    return ref, out


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(num_hidden_layers=2, num_attention_heads=3, hidden_size=48, intermediate_size=20, num_labels=2),
        # base-sized layers (768 hidden, 12 heads, 3072 intermediate) with a small vocabulary
        dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=12, num_labels=60),
    ],
    ids=["tiny", "odd-heads", "base-sized"],
)
def test_forward_matches_transformers_fp32(overrides):
    hf = hf_classifier(**overrides)
    ours = native_from(hf)
    ids, mask = padded_batch(hf.config.vocab_size, [13, 5, 1 + 1, 9])
    with torch.no_grad():
        ref, out = run_both(hf, ours, ids, mask)
    torch.testing.assert_close(out.logits, ref.logits, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out.embeddings, ref.hidden_states[0], atol=FP32_ATOL, rtol=0)
    assert len(out.hidden) == len(ref.hidden_states) - 1
    for ours_h, ref_h in zip(out.hidden, ref.hidden_states[1:]):
        torch.testing.assert_close(ours_h, ref_h, atol=FP32_ATOL, rtol=0)
    for ours_p, ref_p in zip(out.probs, ref.attentions):
        torch.testing.assert_close(ours_p, ref_p, atol=FP32_ATOL, rtol=0)


def test_scores_are_pre_softmax_and_masked():
    hf = hf_classifier()
    ours = native_from(hf)
    ids, mask = padded_batch(hf.config.vocab_size, [6, 3])
    with torch.no_grad():
        out = ours(ids, mask, taps=Taps(layers=(1,), scores=True, probs=True, qk=True))
    scores, probs, q, k = out.scores[0], out.probs[0], out.q[0], out.k[0]
    torch.testing.assert_close(scores.softmax(-1), probs)
    expected = q @ k.transpose(-1, -2) / math.sqrt(ours.cfg.head_dim)
    valid = mask.bool()[:, None, None, :].expand_as(scores)
    torch.testing.assert_close(scores[valid], expected[valid])
    assert (scores[~valid] == torch.finfo(scores.dtype).min).all()


def test_untapped_layers_keep_nothing():
    hf = hf_classifier(num_hidden_layers=4)
    ours = native_from(hf)
    ids, mask = padded_batch(hf.config.vocab_size, [7, 4])
    with torch.no_grad():
        out = ours(ids, mask, taps=Taps(layers=(1, 3), hidden=True, probs=True))
        plain = ours(ids, mask)
    assert len(out.hidden) == 2 and len(out.probs) == 2
    assert out.scores == [] and out.q == [] and out.embeddings is None
    assert plain.hidden == [] and plain.probs == [] and plain.embeddings is None
    torch.testing.assert_close(out.logits, plain.logits, atol=FP32_ATOL, rtol=0)


def test_position_ids_follow_roberta_rule():
    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 2, 1, 1, 1, 1]])
    assert position_ids(ids, pad_id=1).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 1, 1, 1, 1]]


def test_gradients_match_transformers():
    hf = hf_classifier(num_hidden_layers=2)
    ours = native_from(hf)
    ids, mask = padded_batch(hf.config.vocab_size, [9, 4, 6])
    labels = torch.tensor([0, 3, 1])
    ref_loss = torch.nn.functional.cross_entropy(hf(input_ids=ids, attention_mask=mask).logits, labels)
    our_loss = torch.nn.functional.cross_entropy(ours(ids, mask).logits, labels)
    ref_loss.backward()
    our_loss.backward()
    torch.testing.assert_close(our_loss, ref_loss, atol=FP32_ATOL, rtol=0)
    ref_grads = {canonical_key(k): p.grad for k, p in hf.named_parameters()}
    our_grads = native_to_hf({name: p.grad for name, p in ours.named_parameters()})
    assert our_grads.keys() == ref_grads.keys()
    for key, grad in our_grads.items():
        torch.testing.assert_close(grad, ref_grads[key], atol=1e-6, rtol=1e-4, msg=key)


def test_dropout_is_active_in_training_and_off_in_eval():
    hf = hf_classifier(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    ours = native_from(hf)
    ids, mask = padded_batch(hf.config.vocab_size, [8, 8])
    ours.train()
    torch.manual_seed(0)
    a = ours(ids, mask).logits
    b = ours(ids, mask).logits
    assert not torch.allclose(a, b)
    ours.eval()
    torch.testing.assert_close(ours(ids, mask).logits, ours(ids, mask).logits, atol=0, rtol=0)


def _saved_bytes_and_grads(model, ids, mask, taps):
    """(bytes autograd saved for backward, the step's tap counts, its loss and gradients) of one
    training forward/backward whose loss reads the logits and every tap."""
    saved = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, mask, taps)
        taps_out = [*out.hidden, *out.scores, *out.probs, *out.q, *out.k]
        loss = out.logits.square().sum() + sum(t.float().clamp(-1e4, 1e4).square().mean() for t in taps_out)
    loss.backward()
    counts = [len(out.hidden), len(out.scores), len(out.probs), len(out.q), len(out.k)]
    return sum(saved.values()), counts, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recompute_is_the_same_step_keeping_less_for_backward():
    """--recompute (activation checkpointing): with dropout in the hidden states and attention,
    taps on some layers and an untapped last layer, the loss and every gradient are bit-equal to
    the plain step's, each tap is recorded once, and autograd keeps under half the bytes."""
    hf = hf_classifier(num_hidden_layers=4, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    ours = native_from(hf).train()
    ids, mask = padded_batch(hf.config.vocab_size, [12, 5, 9, 12])
    taps = Taps(layers=(0, 2), embeddings=True, hidden=True, scores=True, probs=True, qk=True)
    plain = _saved_bytes_and_grads(ours, ids, mask, taps)
    ours.recompute = True
    again = _saved_bytes_and_grads(ours, ids, mask, taps)
    assert again[1] == plain[1] == [2] * 5
    assert torch.equal(again[2], plain[2])
    for name, grad in plain[3].items():
        assert torch.equal(again[3][name], grad), name
    assert again[0] < 0.5 * plain[0], (again[0], plain[0])
    with torch.no_grad():  # outside training's backward it is the plain forward
        torch.testing.assert_close(ours.eval()(ids, mask).logits, hf(input_ids=ids, attention_mask=mask).logits,
                                   atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_keeps_1_minus_p_independently_and_scales(p):
    """The hashed CPU dropout: keep rate within 4 sigma of 1 - p, kept values scaled by 1/(1-p),
    masks uncorrelated between neighbours, rows and calls, the same under the same seed."""
    from xlmr_mini.model import dropout
    x = torch.full((256, 4096), 2.0)
    torch.manual_seed(1)
    a, b = dropout(x, p, True), dropout(x, p, True)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, p, True), a)
    assert a.unique().tolist() == pytest.approx([0.0, 2.0 / (1 - p)])
    n = x.numel()
    assert abs((a != 0).float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    keep_a, keep_b = (a != 0).float().flatten(), (b != 0).float().flatten()
    for u, v in ((keep_a[:-1], keep_a[1:]), (keep_a[:-4096], keep_a[4096:]), (keep_a, keep_b)):
        assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 5 / n ** 0.5
    assert torch.equal(dropout(x, p, False), x) and torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))


def test_cpu_dropout_compiled_draws_the_eager_mask():
    """Under torch.compile (inductor's vectorized C++ and its scalar tail, 4099 elements) the
    integer hash wraps as eager's does: with the same seed (eager's generator), the same mask."""
    import torch._inductor.config as inductor_config
    from xlmr_mini.model import dropout
    x = torch.randn(3, 4099)
    with unittest.mock.patch.object(inductor_config, "fallback_random", True):
        compiled = torch.compile(lambda t: dropout(t, 0.1, True), fullgraph=True)
        torch.manual_seed(3)
        eager = dropout(x, 0.1, True)
        torch.manual_seed(3)
        assert torch.equal(compiled(x), eager)


# bf16: both implementations are compared with the fp32 result; ours must be within 2x of
# transformers' own bf16 error (plus a small floor for ties in rounding).
@pytest.mark.parametrize("mode", ["bf16-weights", "autocast"])
def test_bf16_error_within_2x_of_transformers(mode):
    hf = hf_classifier(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    ours = native_from(hf)
    ids, mask = padded_batch(hf.config.vocab_size, [12, 5, 9])
    with torch.no_grad():
        exact = hf(input_ids=ids, attention_mask=mask).logits
        if mode == "bf16-weights":
            ref = hf.to(torch.bfloat16)(input_ids=ids, attention_mask=mask).logits.float()
            got = ours.to(torch.bfloat16)(ids, mask).logits.float()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref = hf(input_ids=ids, attention_mask=mask).logits.float()
                got = ours(ids, mask).logits.float()
    ref_err = (ref - exact).abs().max().item()
    our_err = (got - exact).abs().max().item()
    assert our_err <= 2 * ref_err + 1e-3, (our_err, ref_err)
