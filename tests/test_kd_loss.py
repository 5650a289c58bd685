"""The KD loss reference (paper §2.1) against hand computations, gradcheck, and the fused path."""
import dataclasses
import importlib
import math

import pytest
import torch

from xlmr_mini.config import XLMRConfig
from xlmr_mini.kd_loss import HiddenProjection, KDLossConfig, kd_loss, kd_taps, teacher_positions
from xlmr_mini.model import Output, Taps, XLMRClassifier, init_weights

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # lengths 3 and 2: one pad position
VALID = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def _outputs(seed: int, layers: int, hidden: int, heads: int = 2, dtype=torch.float64):
    """An Output with `layers` tapped layers, random values; pads hold inf/min like the model's."""
    g = torch.Generator().manual_seed(seed)
    b, t = MASK.shape
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    keep = MASK.bool()[:, None, None, :]
    scores = [rnd(b, heads, t, t).masked_fill(~keep, torch.finfo(dtype).min) for _ in range(layers)]
    hidden_states = [rnd(b, t, hidden) for _ in range(layers)]
    emb = rnd(b, t, hidden)
    if seed == 1:  # the teacher: garbage at pads must not reach the loss
        for h in hidden_states + [emb]:
            h[1, 2] = float("inf")
    return Output(logits=rnd(b, 3), embeddings=emb, hidden=hidden_states, scores=scores,
                  probs=[s.softmax(-1) for s in scores])


def _masked_mse_by_hand(a, b):
    """Mean over valid (b, t) tokens and units, as loops."""
    total, count = 0.0, 0
    for bi, ti in VALID:
        for d in range(a.shape[-1]):
            total += (a[bi, ti, d].item() - b[bi, ti, d].item()) ** 2
            count += 1
    return total / count


def _att_mse_by_hand(a, b):
    """Entries (b, h, q, k) with both q and k valid; mean over them (equal-length-weighted heads)."""
    total, count = 0.0, 0
    for bi, qi in VALID:
        for _, ki in [v for v in VALID if v[0] == bi]:
            for h in range(a.shape[1]):
                total += (a[bi, h, qi, ki].item() - b[bi, h, qi, ki].item()) ** 2
                count += 1
    return total / count


@pytest.mark.parametrize("target", ["scores", "probs"])
def test_each_term_matches_hand_computation_with_padding(target):
    s, t = _outputs(0, layers=2, hidden=4), _outputs(1, layers=4, hidden=4)
    labels = torch.tensor([2, 0])
    lmap = [1, 3]
    # The teacher output holds only its tapped layers (1 and 3, 0-based), in order.
    t.hidden, t.scores, t.probs = [t.hidden[1], t.hidden[3]], [t.scores[1], t.scores[3]], [t.probs[1], t.probs[3]]
    total, terms = kd_loss(s, t, labels, MASK, KDLossConfig(att_target=target), layer_map=lmap)
    maps_s, maps_t = (s.scores, t.scores) if target == "scores" else (s.probs, t.probs)
    att = sum(_att_mse_by_hand(maps_s[i], maps_t[i]) for i in range(2)) / 2
    hid = sum(_masked_mse_by_hand(s.hidden[i], t.hidden[i]) for i in range(2)) / 2
    embd = _masked_mse_by_hand(s.embeddings, t.embeddings)
    pred = ((s.logits - t.logits) ** 2).mean().item()
    logp = s.logits.log_softmax(-1)
    clf = -(logp[0, 2] + logp[1, 0]).item() / 2
    expected = {"att": att, "hid": hid, "embd": embd, "pred": pred, "clf": clf}
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-6), name
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-6)
    assert math.isfinite(total.item())


def test_no_kd_is_classification_only():
    s = _outputs(0, layers=2, hidden=4)
    labels = torch.tensor([1, 1])
    total, terms = kd_loss(s, None, labels, MASK, KDLossConfig(kd=False))
    assert total.item() == pytest.approx(torch.nn.functional.cross_entropy(s.logits, labels).item())
    assert all(terms[k].item() == 0.0 for k in ("att", "hid", "embd", "pred"))


def test_term_weights_scale_the_total():
    s, t = _outputs(0, layers=1, hidden=4), _outputs(1, layers=1, hidden=4)
    labels = torch.tensor([0, 1])
    _, terms = kd_loss(s, t, labels, MASK, KDLossConfig(), layer_map=[0])
    total, _ = kd_loss(s, t, labels, MASK, KDLossConfig(w_att=2.0, w_clf=0.0), layer_map=[0])
    expected = 2 * terms["att"] + terms["hid"] + terms["embd"] + terms["pred"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-9)


def test_select_projection_compares_with_copied_units():
    s, t = _outputs(0, layers=1, hidden=2), _outputs(1, layers=1, hidden=6)
    proj = HiddenProjection(2, 6, mode="select")
    assert proj.index.tolist() == [0, 3] and not list(proj.parameters())
    _, terms = kd_loss(s, t, torch.tensor([0, 1]), MASK, KDLossConfig(hid_proj="select"), proj, layer_map=[0])
    expected = _masked_mse_by_hand(s.hidden[0], t.hidden[0][..., [0, 3]])
    assert terms["hid"].item() == pytest.approx(expected, rel=1e-9)


def test_linear_projection_is_fit_dense_and_identity_at_equal_width():
    assert HiddenProjection(4, 4).mode == "identity" and not list(HiddenProjection(4, 4).parameters())
    proj = HiddenProjection(2, 6).double()
    s, t = _outputs(0, layers=1, hidden=2), _outputs(1, layers=1, hidden=6)
    _, terms = kd_loss(s, t, torch.tensor([0, 1]), MASK, KDLossConfig(), proj, layer_map=[0])
    expected = _masked_mse_by_hand(proj.fit_dense(s.hidden[0]).detach(), t.hidden[0])
    assert terms["hid"].item() == pytest.approx(expected, rel=1e-9)


def test_teacher_taps_only_mapped_layers():
    cfg = KDLossConfig()
    assert kd_taps(cfg, [3, 1]).layers == (1, 3)
    assert kd_taps(cfg, [1]).probs and not kd_taps(cfg, [1]).scores and not kd_taps(cfg, [1]).qk
    assert kd_taps(KDLossConfig(att_target="scores"), [1]).scores
    assert kd_taps(KDLossConfig(impl="fused"), [1]).qk and not kd_taps(KDLossConfig(impl="fused"), [1]).scores
    assert kd_taps(KDLossConfig(kd=False), [1]) is None
    assert teacher_positions([1, 3, 5]) == [0, 1, 2]


@pytest.mark.parametrize("target", ["scores", "probs"])
def test_gradcheck_float64(target):
    s0, t = _outputs(0, layers=2, hidden=2), _outputs(1, layers=2, hidden=4)
    proj = HiddenProjection(2, 4).double()
    labels = torch.tensor([2, 0])
    # Pre-softmax scores: gradcheck perturbs entries; keep the masked ones at a finite sentinel.
    maps = [x.clamp(min=-1e4) for x in s0.scores] if target == "scores" else s0.probs
    leaves = [s0.embeddings, *s0.hidden, *maps, s0.logits]
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves + [proj.fit_dense.weight, proj.fit_dense.bias]]

    def loss(emb, h0, h1, a0, a1, z, w, bias):
        s = Output(logits=z, embeddings=emb, hidden=[h0, h1], **{target: [a0, a1]})
        return kd_loss(s, t, labels, MASK, KDLossConfig(att_target=target), _functional_proj(w, bias),
                       layer_map=[0, 1])[0]

    assert torch.autograd.gradcheck(loss, leaves, eps=1e-6, atol=1e-7)


def _functional_proj(w, b):
    return lambda h_s, h_t: (h_s @ w.T + b, h_t)


def _tiny(layers: int, seed: int) -> XLMRClassifier:
    cfg = XLMRConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=40, max_position_embeddings=40, id2label=("a", "b", "c"))
    torch.manual_seed(seed)
    model = XLMRClassifier(cfg)
    init_weights(model, 0.2)
    return model.eval()


@pytest.mark.parametrize("target", ["scores", "probs"])
def test_fused_path_matches_reference_on_real_taps(target, monkeypatch):
    """Through the model's taps: qk + fused kernels vs maps + reference, on a GPU where there is
    one (the compiled kernels), else on CPU (Triton's interpreter). The kernels must have run: a
    fused path that fell back to the reference would pass by comparing it with itself."""
    from conftest import padded_batch
    from xlmr_mini.kernels import _dispatch

    launched = []

    def counting(kernel, *args):
        launched.append(kernel)
        return _dispatch.launch(kernel, *args)

    for module in ("attention_kd", "layer_mse"):  # the modules, not the same-named functions
        monkeypatch.setattr(importlib.import_module(f"xlmr_mini.kernels.{module}"), "launch", counting)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, student = _tiny(4, 0).to(device), _tiny(2, 1).to(device)
    ids, mask = (x.to(device) for x in padded_batch(50, [7, 3, 5]))
    labels = torch.tensor([0, 2, 1], device=device)
    results = []
    for impl in ("reference", "fused"):
        cfg = KDLossConfig(att_target=target, impl=impl)
        student.zero_grad()
        with torch.inference_mode():
            t_out = teacher(ids, mask, kd_taps(cfg, [1, 3]))
        s_out = student(ids, mask, kd_taps(cfg, [0, 1]))
        total, terms = kd_loss(s_out, t_out, labels, mask, cfg, layer_map=[1, 3])
        total.backward()
        results.append((terms, [p.grad.clone() for p in student.parameters()]))
        assert bool(launched) == (impl == "fused"), (impl, launched)
    # layer MSE (hidden states, embeddings), the Q/K forward, its dQ and dK backward launches
    assert {k.fn.__name__ for k in launched} == {
        "_layer_mse_kernel", "_score_mse_fwd_kernel", "_score_mse_bwd_kernel"}
    (terms_r, grads_r), (terms_f, grads_f) = results
    for name in terms_r:
        torch.testing.assert_close(terms_f[name], terms_r[name], atol=1e-6, rtol=1e-5)
    for g_f, g_r in zip(grads_f, grads_r):
        torch.testing.assert_close(g_f, g_r, atol=1e-6, rtol=1e-4)


def _tinybert_task_distill(student_atts, teacher_atts, student_reps, teacher_reps):
    """TinyBERT's task_distill.py intermediate-layer loss, transcribed line for line: all teacher
    layers in, every `layers_per_block`-th picked, nn.MSELoss per layer, summed."""
    loss_mse = torch.nn.MSELoss()
    att_loss, rep_loss = 0.0, 0.0
    teacher_layer_num, student_layer_num = len(teacher_atts), len(student_atts)
    layers_per_block = int(teacher_layer_num / student_layer_num)
    new_teacher_atts = [teacher_atts[i * layers_per_block + layers_per_block - 1] for i in range(student_layer_num)]
    for student_att, teacher_att in zip(student_atts, new_teacher_atts):
        student_att = torch.where(student_att <= -1e2, torch.zeros_like(student_att), student_att)
        teacher_att = torch.where(teacher_att <= -1e2, torch.zeros_like(teacher_att), teacher_att)
        att_loss += loss_mse(student_att, teacher_att)
    new_teacher_reps = [teacher_reps[i * layers_per_block] for i in range(student_layer_num + 1)]
    for student_rep, teacher_rep in zip(student_reps, new_teacher_reps):
        rep_loss += loss_mse(student_rep, teacher_rep)
    return att_loss, rep_loss


@pytest.mark.parametrize("target", ["scores", "probs"])
def test_tinybert_norm_equals_its_code_on_a_padded_batch(target):
    from conftest import padded_batch

    teacher, student = _tiny(4, 0), _tiny(2, 1)
    ids, mask = padded_batch(50, [9, 2, 5])  # heavy padding: where the two normalisations differ
    labels = torch.tensor([0, 2, 1])
    every = Taps(layers=(0, 1, 2, 3), embeddings=True, hidden=True, scores=True, probs=True)
    with torch.no_grad():
        t_all, s_all = teacher(ids, mask, every), student(ids, mask, dataclasses.replace(every, layers=(0, 1)))
    maps = "scores" if target == "scores" else "probs"
    att, rep = _tinybert_task_distill(getattr(s_all, maps), getattr(t_all, maps),
                                      [s_all.embeddings] + s_all.hidden, [t_all.embeddings] + t_all.hidden)
    cfg = KDLossConfig(att_target=target, loss_norm="tinybert")
    with torch.no_grad():
        t_out = teacher(ids, mask, kd_taps(cfg, [1, 3]))
        _, terms = kd_loss(student(ids, mask, kd_taps(cfg, [0, 1])), t_out, labels, mask, cfg, layer_map=[1, 3])
        _, masked = kd_loss(student(ids, mask, kd_taps(cfg, [0, 1])), t_out, labels, mask,
                            KDLossConfig(att_target=target), layer_map=[1, 3])
    torch.testing.assert_close(terms["att"], torch.as_tensor(att, dtype=torch.float32), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms["hid"] + terms["embd"], torch.as_tensor(rep, dtype=torch.float32),
                               atol=1e-6, rtol=1e-5)
    # ... and it is a different number from the masked default on this batch.
    assert not torch.allclose(terms["att"], masked["att"], rtol=1e-2)


def test_tinybert_norm_needs_the_reference_impl():
    from xlmr_mini.errors import InputError

    with pytest.raises(InputError, match="reference"):
        KDLossConfig(loss_norm="tinybert", impl="fused")


@pytest.mark.parametrize("norm,target,impl", [("masked", "probs", "reference"), ("masked", "scores", "reference"),
                                              ("tinybert", "probs", "reference"), ("masked", "probs", "fused"),
                                              ("masked", "scores", "fused")])
def test_shares_with_global_counts_add_up_to_the_whole_batch(norm, target, impl):
    """Data parallel: each share of a batch (rows keep the batch's padded length) divided by the
    whole batch's counts gives a part of the loss; the parts, and their gradients, add up to the
    whole batch's loss and gradient. Counts of the whole batch itself change nothing. The fused
    kernels (interpreted on CPU) take the counts as the reference does."""
    from conftest import padded_batch
    from xlmr_mini.kd_loss import LossCounts

    teacher, student = _tiny(4, 0), _tiny(2, 1)
    proj = HiddenProjection(32, 32)
    ids, mask = padded_batch(50, [9, 2, 5, 7, 3])
    labels = torch.tensor([0, 2, 1, 1, 0])
    cfg = KDLossConfig(att_target=target, loss_norm=norm, impl=impl)
    shares = [[0, 3], [1, 2, 4]]
    counts = LossCounts.unstack(sum(LossCounts.of(mask[rows]).stack() for rows in shares))
    assert counts == LossCounts.of(mask)

    def loss_and_grads(rows, counts):
        student.zero_grad()
        with torch.inference_mode():
            t_out = teacher(ids[rows], mask[rows], kd_taps(cfg, [1, 3]))
        s_out = student(ids[rows], mask[rows], kd_taps(cfg, [0, 1]))
        total, terms = kd_loss(s_out, t_out, labels[rows], mask[rows], cfg, proj, [1, 3], counts)
        total.backward()
        return total.detach(), terms, [p.grad.clone() for p in student.parameters()]

    whole, whole_terms, whole_grads = loss_and_grads(list(range(5)), None)
    parts = [loss_and_grads(rows, counts) for rows in shares]
    torch.testing.assert_close(sum(p[0] for p in parts), whole, atol=1e-6, rtol=1e-5)
    for name in whole_terms:
        torch.testing.assert_close(sum(p[1][name] for p in parts), whole_terms[name], atol=1e-6, rtol=1e-5)
    for i, g in enumerate(whole_grads):
        torch.testing.assert_close(sum(p[2][i] for p in parts), g, atol=1e-6, rtol=1e-4)
    same, _, _ = loss_and_grads(list(range(5)), LossCounts.of(mask))
    torch.testing.assert_close(same, whole, atol=1e-6, rtol=1e-6)
