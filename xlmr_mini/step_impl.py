"""How the KD step runs on this device: `--kd-impl auto|reference|fused` and `--compile
auto|on|off`, resolved per device and checked on the run's own first batch.

- `--kd-impl auto` (the default): the fused Triton kernels where they run compiled (`fused_device`:
  CUDA with Triton) and apply (KD with the masked normalisation; KD already requires the
  teacher's head count), the PyTorch reference everywhere else. On CPU the kernels would run
  through Triton's interpreter, which is for tests only.
- `--compile auto` (the default): compiled where a measurement says it pays, on any device. The
  eager step is timed on the run's first batch; a run whose eager steps take under
  `MIN_PROBED_S` in all is too short for any compile to pay back and stays eager unprobed.
  Otherwise the compiled step is checked against eager and timed (compile time apart), once per
  device, software versions, precision and model shape; it runs when it is `MIN_SPEEDUP` faster
  and its saving over the run's remaining steps is at least `PAYBACK` compiles.
- Explicit choices (`reference`, `fused`, `on`, `off`) run as given, unchecked.

The self-check. What `auto` chose beyond the eager reference step is checked before the first
step, on the run's first batch (this process's share of it), with the student in eval mode (no
dropout) and nothing written to its gradients: first the fused loss terms and gradients against
the reference's, then the compiled step against the eager one, at the run's precision within
`TOLERANCES`. On a mismatch, a compile error or any exception the run falls back (to the
reference, to eager) and says so in one line. Outcomes are cached per device name, torch and
Triton versions, precision and attention target in `cache_dir/hardware/` (as the bf16 probe);
results.json records `kd_impl` and `compile`, asked and used, and the check's outcome
(`step_check`). Under torchrun every process checks its share, and all fall back if one fails.
The check compiles the step in eval mode; training then compiles its train-mode graph once more.
"""
import dataclasses

import torch

import statistics
import time

from xlmr_mini import distributed
from xlmr_mini.hardware import cached_probe, device_name, synchronize
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
MIN_PROBED_S = 300.0  # eager seconds a run must need before a compile probe: a compile takes tens of seconds or more
MIN_SPEEDUP = 1.1  # eager time / compiled time, at least
PAYBACK = 3.0  # the saving must cover this many compiles: the probe's, training's graph, a recompile for other lengths


def fused_device(device: torch.device) -> bool:
    """Whether the fused kernels run compiled on `device`: CUDA with Triton."""
    return device.type == "cuda" and HAS_TRITON


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
    # auto: a candidate until `check_step` has measured it on the run's first batch.
    return StepPlan(kd_impl, impl, compile, compile in ("auto", "on"))


def check_step(ctx: StepContext, plan: StepPlan, batch: dict, device, cache_dir, steps: int) -> StepPlan:
    """Check what `auto` chose on `batch` (`steps`: the optimizer steps the run has left), and
    decide `--compile auto`; on a failure, switch `ctx` back (the reference loss, eager) and say
    so. Returns the plan that runs, with the check's outcome."""
    if not (plan.check_fused or plan.check_compiled):
        return plan
    precision = "bf16" if ctx.bf16 else "fp32"
    atol, rtol = TOLERANCES[precision]
    checked = {"device": device_name(device), "torch": torch.__version__, "triton": _triton_version(),
               "precision": precision, "atol": atol, "rtol": rtol}
    plan = dataclasses.replace(plan, check=checked)
    probe = _Probe(ctx, batch, device)
    machine = [checked["device"], f"torch {checked['torch']}", f"triton {checked['triton']}", precision,
               ctx.loss_cfg.att_target]
    if plan.check_fused:
        outcome, cached = cached_probe(cache_dir, "kd-step-check", "|".join([*machine, "fused"]),
                                       lambda: {"fused": probe.compare("fused", forward_loss, atol, rtol)})
        checked["fused"] = {**_all_ranks(outcome["fused"]), "cached": cached}
        if not checked["fused"]["ok"]:
            _say_fallback("fused", checked["fused"]["detail"], checked, cached)
            plan.kd_impl = "reference"
            ctx.loss_cfg = dataclasses.replace(ctx.loss_cfg, impl="reference")
    if plan.check_compiled:
        checked["compiled"] = decision = _decide_compile(ctx, plan, probe, machine, steps, cache_dir)
        if not decision["ok"]:
            _say_fallback("compiled", decision["detail"], checked, decision["cached"])
        elif decision.get("probed"):
            print(f"--compile auto: {'on' if decision['pays'] else 'off'} ({decision['detail']})")
        if not (decision["ok"] and decision["pays"]):
            plan.compiled = False
            ctx.loss_fn = None
    return plan


def _decide_compile(ctx: StepContext, plan: StepPlan, probe: "_Probe", machine: list[str], steps: int,
                    cache_dir) -> dict:
    """{"ok", "pays", "detail", timings}: whether the compiled step is right and pays over `steps`."""
    atol, rtol = TOLERANCES["bf16" if ctx.bf16 else "fp32"]
    eager_s = _max_over_ranks(probe.time(plan.kd_impl, forward_loss))
    if eager_s * steps < MIN_PROBED_S:
        return {"ok": True, "pays": False, "cached": False, "eager_s": eager_s, "steps": steps,
                "detail": f"not probed: the run's {steps:,} steps take ~{eager_s * steps:,.0f} s eager, too few for a "
                          f"compile to pay back"}
    cfg = ctx.student.cfg
    shape = (f"student {cfg.num_hidden_layers}L/{cfg.hidden_size}/{cfg.num_attention_heads}h/"
             f"{cfg.intermediate_size}/{cfg.vocab_size}, {plan.kd_impl}, kd {ctx.loss_cfg.kd}"
             + (", recompute" if ctx.student.recompute else ""))  # another graph, another speedup
    outcome, cached = cached_probe(cache_dir, "compile-probe", "|".join([*machine, shape]),
                                   lambda: probe.time_compiled(plan.kd_impl, ctx.loss_fn, eager_s, atol, rtol))
    outcome = _all_ranks(outcome)
    record = {**outcome, "cached": cached, "probed": True, "eager_s": eager_s, "steps": steps}
    if not outcome["ok"]:
        return {**record, "pays": False}
    speedup, compile_s = outcome["speedup"], outcome["compile_s"]
    saving = eager_s * steps * (1 - 1 / speedup)
    pays = speedup >= MIN_SPEEDUP and saving >= PAYBACK * compile_s
    detail = (f"the compiled step ran {speedup:.2f}x eager on the first batch and compiles in ~{compile_s:,.0f} s; over "
              f"the run's {steps:,} steps it would save ~{saving:,.0f} s{', cached' if cached else ''}")
    return {**record, "pays": pays, "saving_s": saving, "detail": detail}


def _all_ranks(outcome: dict) -> dict:
    """Under torchrun, the first failing process's outcome (so that all fall back together)."""
    ranks = distributed.all_gather(outcome)
    return next((o for o in ranks if not o["ok"]), outcome) if ranks else outcome


def _max_over_ranks(seconds: float) -> float:
    return max(distributed.all_gather(seconds) or [seconds])


def _say_fallback(part: str, detail: str, checked: dict, cached: bool) -> None:
    what, instead = {"fused": ("the fused KD loss", "the reference"), "compiled": ("the compiled step", "eager")}[part]
    print(f"{_flag(part)} auto: {what} {detail} on the first batch ({checked['precision']}, atol {checked['atol']:g}, "
          f"rtol {checked['rtol']:g}{', cached' if cached else ''}); training with {instead}")


def _triton_version() -> str:
    return getattr(triton, "__version__", "none")


def _flag(part: str) -> str:
    return "--kd-impl" if part == "fused" else "--compile"


class _Probe:
    """The first batch's loss and gradients under each variant, in eval mode (every variant then
    computes the same function) and without touching `.grad`; the teacher runs (or is read) once."""

    def __init__(self, ctx: StepContext, batch: dict, device):
        self.ctx, self.device = ctx, device
        self.inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")]
        self.counts = None if ctx.parallel is None else LossCounts.of(self.inputs[1])  # as train_step gives them
        self.index = batch.get("index")
        self._teacher, self._reference = {}, None

    def run(self, impl: str, loss_fn) -> tuple[dict, torch.Tensor]:
        ctx = self.ctx
        loss_cfg: KDLossConfig = dataclasses.replace(ctx.loss_cfg, impl=impl)
        if impl not in self._teacher:  # the fused loss may read other taps (Q and K) than the reference
            input_ids, mask, _ = self.inputs
            # The live teacher while there is one (the cache holds one loss form's taps), else the cache.
            cache = None if ctx.teacher is not None else ctx.teacher_cache
            live = dataclasses.replace(ctx, loss_cfg=loss_cfg, teacher_cache=cache)
            self._teacher[impl] = teacher_forward(live, input_ids, mask, self.index)
        was_training = ctx.student.training
        ctx.student.eval()
        try:
            return _loss_and_grads(ctx, loss_cfg, loss_fn, self.inputs, self.counts, self._teacher[impl])
        finally:
            ctx.student.train(was_training)

    def reference(self) -> tuple[dict, torch.Tensor]:
        if self._reference is None:
            self._reference = self.run("reference", forward_loss)
        return self._reference

    def compare(self, impl: str, loss_fn, atol: float, rtol: float) -> dict:
        reference = self.reference()
        return _compare(lambda: self.run(impl, loss_fn), reference, atol, rtol)

    def time(self, impl: str, loss_fn, repeats: int = 2) -> float:
        """Median seconds of a step's forward and backward (after a first, untimed one)."""
        self.run(impl, loss_fn)
        times = []
        for _ in range(repeats):
            synchronize(self.device)
            t0 = time.perf_counter()
            self.run(impl, loss_fn)
            synchronize(self.device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def time_compiled(self, impl: str, loss_fn, eager_s: float, atol: float, rtol: float) -> dict:
        """The compiled step checked against eager, then timed: its speedup and compile time."""
        reference = self.run(impl, forward_loss)
        synchronize(self.device)
        t0 = time.perf_counter()
        outcome = _compare(lambda: self.run(impl, loss_fn), reference, atol, rtol)
        synchronize(self.device)
        first_s = time.perf_counter() - t0
        if not outcome["ok"]:
            return outcome
        compiled_s = self.time(impl, loss_fn)
        return {**outcome, "compiled_s": compiled_s, "speedup": eager_s / compiled_s,
                "compile_s": max(0.0, first_s - compiled_s)}


def _loss_and_grads(ctx: StepContext, loss_cfg: KDLossConfig, loss_fn, inputs, counts,
                    teacher_out) -> tuple[dict, torch.Tensor]:
    """({terms..., "loss"} as floats, every parameter's gradient as one vector); `.grad` untouched."""
    input_ids, mask, labels = inputs
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
