"""How the KD step runs on this device: `--kd-impl auto|reference|fused` and `--compile
auto|on|off`, resolved per device and checked on the run's own first batch.

- `--kd-impl auto` (the default): the fused Triton kernels where they run compiled (`fused_device`:
  CUDA with Triton) and apply (KD with the masked normalisation; KD already requires the
  teacher's head count), the PyTorch reference everywhere else. On CPU the kernels would run
  through Triton's interpreter, which is for tests only.
- `--compile auto` (the default): `compile_by_default`, on CUDA and off on CPU for now.
- Explicit choices (`reference`, `fused`, `on`, `off`) run as given, unchecked.

The self-check. What `auto` chose beyond the eager reference step is checked before the first
step, on the run's first batch (this process's share of it), with the student in eval mode (no
dropout) and nothing written to its gradients: first the fused loss terms and gradients against
the reference's, then the compiled step against the eager reference, at the run's precision
within `TOLERANCES`. On a mismatch, a compile error or any exception the run falls back (to the
reference, to eager) and says so in one line. The outcome is cached per device name, torch and
Triton versions, precision and attention target in `cache_dir/hardware/` (as the bf16 probe);
results.json records `kd_impl` and `compile`, asked and used, and the check's outcome
(`step_check`). Under torchrun every process checks its share, and all fall back if one fails.
The check compiles the step in eval mode; training then compiles its train-mode graph once more.
"""
import dataclasses

import torch

from xlmr_mini import distributed
from xlmr_mini.hardware import cached_probe, device_name
from xlmr_mini.kd_loss import IMPLS, KDLossConfig, LossCounts
from xlmr_mini.kd_step import StepContext, forward_loss, teacher_forward
from xlmr_mini.kernels._dispatch import HAS_TRITON, triton

KD_IMPLS = ("auto", *IMPLS)
COMPILES = ("auto", "on", "off")
# (atol, rtol) of the self-check per precision: |candidate - reference| <= atol + rtol * |reference|
# for each loss term, and for the gradients (all parameters as one vector) divided by the
# reference gradient's largest entry. bf16's covers the rounding of bf16 scores and activations,
# which the two paths round at different places; a wrong kernel is off by far more.
TOLERANCES = {"fp32": (1e-5, 1e-3), "bf16": (1e-2, 5e-2)}


def fused_device(device: torch.device) -> bool:
    """Whether the fused kernels run compiled on `device`: CUDA with Triton."""
    return device.type == "cuda" and HAS_TRITON


def compile_by_default(device: torch.device) -> bool:
    """`--compile auto`: on CUDA, off on CPU. One function, for a measurement to replace."""
    return device.type == "cuda"


@dataclasses.dataclass
class StepPlan:
    """What the step runs (`kd_impl`, `compiled`), what was asked, and the self-check's outcome."""

    kd_impl_asked: str
    kd_impl: str
    compile_asked: str
    compiled: bool
    check: dict | None = None

    @property
    def check_fused(self) -> bool:
        return self.kd_impl_asked == "auto" and self.kd_impl == "fused"

    @property
    def check_compiled(self) -> bool:
        return self.compile_asked == "auto" and self.compiled

    def record(self) -> dict:
        """results.json's `kd_impl` and `compile` (asked and used), and `step_check` when one ran."""
        check = {} if self.check is None else {"step_check": self.check}
        return {"kd_impl": {"asked": self.kd_impl_asked, "used": self.kd_impl},
                "compile": {"asked": self.compile_asked, "used": self.compiled}, **check}


def plan_step(kd_impl: str, compile: str, device: torch.device, kd: bool, loss_norm: str) -> StepPlan:
    """`--kd-impl` and `--compile` resolved for `device` (before the self-check)."""
    applies = kd and loss_norm == "masked" and fused_device(device)
    impl = ("fused" if applies else "reference") if kd_impl == "auto" else kd_impl
    compiled = compile_by_default(device) if compile == "auto" else compile == "on"
    return StepPlan(kd_impl, impl, compile, compiled)


def check_step(ctx: StepContext, plan: StepPlan, batch: dict, device, cache_dir) -> StepPlan:
    """Check what `auto` chose on `batch`; on a failure, switch `ctx` back (the reference loss,
    eager) and say so. Returns the plan that runs, with the check's outcome."""
    if not (plan.check_fused or plan.check_compiled):
        return plan
    precision = "bf16" if ctx.bf16 else "fp32"
    machine = "|".join([device_name(device), f"torch {torch.__version__}", f"triton {_triton_version()}",
                        precision, ctx.loss_cfg.att_target, f"fused {plan.check_fused}",
                        f"compiled {plan.check_compiled}"])
    outcome, cached = cached_probe(cache_dir, "kd-step-check", machine,
                                   lambda: _run_checks(ctx, plan, batch, device, precision))
    ranks = distributed.all_gather(outcome)
    checked = {**outcome, "cached": cached}
    for part, what, instead in (("fused", "the fused KD loss", "the reference"), ("compiled", "the compiled step",
                                                                                  "eager")):
        failed = [o[part]["detail"] for o in ranks if part in o and not o[part]["ok"]]
        if failed:
            checked[part] = {"ok": False, "detail": failed[0]}
            print(f"{_flag(part)} auto: {what} {failed[0]} on the first batch ({precision}, atol {outcome['atol']:g}, "
                  f"rtol {outcome['rtol']:g}{', cached' if cached else ''}); training with {instead}")
    plan = dataclasses.replace(plan, check=checked)
    if plan.check_fused and not checked["fused"]["ok"]:
        plan.kd_impl = "reference"
        ctx.loss_cfg = dataclasses.replace(ctx.loss_cfg, impl="reference")
    if plan.check_compiled and not checked["compiled"]["ok"]:
        plan.compiled = False
        ctx.loss_fn = None
    return plan


def _triton_version() -> str:
    return getattr(triton, "__version__", "none")


def _flag(part: str) -> str:
    return "--kd-impl" if part == "fused" else "--compile"


def _run_checks(ctx: StepContext, plan: StepPlan, batch: dict, device, precision: str) -> dict:
    atol, rtol = TOLERANCES[precision]
    outcome = {"device": device_name(device), "torch": torch.__version__, "triton": _triton_version(),
               "precision": precision, "atol": atol, "rtol": rtol}
    inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")]
    counts = None if ctx.parallel is None else LossCounts.of(inputs[1])  # as train_step gives them
    was_training = ctx.student.training
    ctx.student.eval()  # no dropout: every variant must compute the same function
    try:
        reference = _loss_and_grads(ctx, "reference", forward_loss, inputs, counts)
        impl = plan.kd_impl
        if plan.check_fused:
            outcome["fused"] = _compare(lambda: _loss_and_grads(ctx, "fused", forward_loss, inputs, counts),
                                        reference, atol, rtol)
            impl = impl if outcome["fused"]["ok"] else "reference"
        if plan.check_compiled:
            outcome["compiled"] = _compare(lambda: _loss_and_grads(ctx, impl, ctx.loss_fn, inputs, counts),
                                           reference, atol, rtol)
    finally:
        ctx.student.train(was_training)
    return outcome


def _loss_and_grads(ctx: StepContext, impl: str, loss_fn, inputs, counts) -> tuple[dict, torch.Tensor]:
    """({terms..., "loss"} as floats, every parameter's gradient as one vector); `.grad` untouched."""
    input_ids, mask, labels = inputs
    loss_cfg: KDLossConfig = dataclasses.replace(ctx.loss_cfg, impl=impl)
    teacher_out = teacher_forward(dataclasses.replace(ctx, loss_cfg=loss_cfg), input_ids, mask)
    total, terms = loss_fn(ctx.student, ctx.proj, input_ids, mask, labels, teacher_out, loss_cfg, ctx.layer_map,
                           ctx.bf16, counts)
    grads = torch.autograd.grad(total, ctx.params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).float().reshape(-1) for p, g in zip(ctx.params, grads)])
    return {**{k: v.item() for k, v in terms.items()}, "loss": total.item()}, flat  # a term names a mismatch first


def _compare(run, reference: tuple[dict, torch.Tensor], atol: float, rtol: float) -> dict:
    """{"ok", "detail", and the errors measured}: `run()`'s loss terms and gradients against the
    reference's; an exception is a failure that names it."""
    try:
        values, grads = run()
    except Exception as e:  # a compile error, a kernel that fails to launch, anything: fall back
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        return {"ok": False, "detail": f"failed ({type(e).__name__}: {first_line})"}
    ref_values, ref_grads = reference
    term_errors = {k: abs(values[k] - ref_values[k]) for k in ref_values}
    bad_terms = [k for k, err in term_errors.items() if not err <= atol + rtol * abs(ref_values[k])]
    scale = ref_grads.abs().max().clamp(min=torch.finfo(torch.float32).tiny)
    grad_diff = (grads - ref_grads).abs() / scale
    grad_error = grad_diff.max().item() if grad_diff.numel() else 0.0
    grads_ok = bool((grad_diff <= atol + rtol * ref_grads.abs() / scale).all())
    errors = {"term_abs_errors": term_errors, "grad_max_error_rel_to_largest": grad_error}
    if bad_terms:
        k = bad_terms[0]
        detail = f"differs from the reference: {k} {values[k]:.6g} vs {ref_values[k]:.6g}"
    elif not grads_ok:
        detail = f"differs from the reference: gradient max |diff| {grad_error:.3g} of its largest entry"
    else:
        return {"ok": True, "detail": "matches the reference", **errors}
    return {"ok": False, "detail": detail, **errors}
