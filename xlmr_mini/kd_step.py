"""The KD training step: student forward + `kd_loss`, backward, clipping, AdamW, the schedule.

`forward_loss` is what `--compile` compiles whole (fullgraph); the teacher's forward runs apart,
under inference mode. `StepContext` holds what a step needs besides the batch.

Under torchrun (`xlmr_mini.distributed`) the student and its projection run inside DDP, each rank
on its share of the global batch; see `train_step` for how the loss and gradient stay the
single-process ones.
"""
import contextlib
import dataclasses
import math

import torch
import torch._functorch.config  # noqa: F401 (the compiled step's activation memory budget)

from xlmr_mini import distributed
from xlmr_mini.kd_loss import HiddenProjection, KDLossConfig, LossCounts, kd_loss, kd_taps
from xlmr_mini.model import Output, Taps, XLMRClassifier
from xlmr_mini.vocab import VocabTrim


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where and what was kept."""


@dataclasses.dataclass
class StepContext:
    """What `train_step` needs besides the batch; `loss_fn` is `forward_loss` or its compiled form."""

    student: XLMRClassifier
    teacher: XLMRClassifier | None
    proj: HiddenProjection | None
    loss_cfg: KDLossConfig
    layer_map: list[int]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    max_grad_norm: float = 1.0
    bf16: bool = False
    loss_fn: object = None
    parallel: torch.nn.Module | None = None  # DDP over `Trained(student, proj)` under torchrun
    vocab: VocabTrim | None = None  # the student's trimmed vocabulary, None when it has the full one
    teacher_cache: object = None  # a `teacher_cache.TeacherCache` read instead of running the teacher


class Trained(torch.nn.Module):
    """The trained modules, student and projection, as one module for DDP to wrap; its forward
    runs `loss_fn` (`forward_loss` or its compiled form) on them."""

    def __init__(self, student: XLMRClassifier, proj: HiddenProjection | None):
        super().__init__()
        self.student, self.proj = student, proj

    def forward(self, loss_fn, *args):
        return loss_fn(self.student, self.proj, *args)


def forward_loss(student, proj, input_ids, mask, labels, teacher_out, loss_cfg: KDLossConfig,
                 lmap: list[int], bf16: bool = False, counts: LossCounts | None = None):
    """Student forward + `kd_loss`: what `--compile` compiles (fullgraph); backward runs outside."""
    taps = kd_taps(loss_cfg, range(student.cfg.num_hidden_layers))
    # The loss runs under autocast too (fit_dense on bf16 states); its terms upcast to fp32.
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = student(input_ids, mask, taps)
        return kd_loss(out, teacher_out, labels, mask, loss_cfg, proj, lmap, counts)


# The compiled step's activation memory budget (torch's partitioner: the share of the default
# min-cut's saved activations it may keep). At 0.5 it recomputes cheap elementwise work (dropout
# masks, casts, GELU) in the backward instead of saving it: on CPU the 6L/768 KD step measured
# faster and smaller (bench/RESULTS.md); lower budgets recompute matmuls and compile for minutes.
ACTIVATION_MEMORY_BUDGET = 0.5


def compile_forward_loss(backend: str = "inductor", dynamic: bool | None = None):
    """`forward_loss` compiled whole (fullgraph=True). The live teacher's outputs are inference
    tensors; a compiled graph may save its inputs for backward, which autograd forbids for those,
    so they are first copied into normal tensors (only the tapped layers: a small, short-lived
    copy). The teacher cache's are normal tensors already.

    `dynamic` as torch.compile takes it. Training leaves it None: the first batch's shapes compile
    a static graph, the second length recompiles one with a dynamic sequence length, and that graph
    serves every later length (two graphs per run; `bench.kd_step`'s xlmr_mini-cached-padded row
    measures the alternative, batches padded to a few lengths each with its static graph)."""
    compiled = torch.compile(forward_loss, fullgraph=True, backend=backend, dynamic=dynamic)

    def loss_fn(student, proj, input_ids, mask, labels, teacher_out, *args):
        with torch._functorch.config.patch(activation_memory_budget=ACTIVATION_MEMORY_BUDGET):
            return compiled(student, proj, input_ids, mask, labels, _normal_tensors(teacher_out), *args)

    return loss_fn


def _normal_tensors(out):
    if out is None or not out.logits.is_inference():
        return out
    copy = lambda xs: [x.clone() for x in xs]  # noqa: E731 (clone outside inference mode = normal tensor)
    return dataclasses.replace(out, logits=out.logits.clone(), hidden=copy(out.hidden), scores=copy(out.scores),
                               probs=copy(out.probs), q=copy(out.q), k=copy(out.k),
                               embeddings=None if out.embeddings is None else out.embeddings.clone())


def bf16_frozen_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Store a frozen model's Linear weights and biases in bf16, once. Autocast would cast them
    to bf16 for every matmul anyway (the same rounding, so the same numbers), but it recasts
    frozen weights on every forward: a quarter of a bf16 KD step on CPU went to those copies."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)
    return model


def run_teacher(teacher: XLMRClassifier, taps: Taps, input_ids, mask, bf16: bool) -> Output:
    """The frozen teacher's forward: inference mode, under the run's precision."""
    with torch.inference_mode(), torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        return teacher(input_ids, mask, taps)


def teacher_forward(ctx: StepContext, input_ids, mask, index=None) -> Output | None:
    """The teacher's outputs for the batch: read from the teacher cache (`index`: the examples'
    positions in the training split) when the run has one, else computed."""
    if not ctx.loss_cfg.kd:
        return None
    if ctx.teacher_cache is not None:
        return ctx.teacher_cache.read(index, mask.shape[1], mask.device)
    if ctx.teacher is None:
        return None
    return run_teacher(ctx.teacher, kd_taps(ctx.loss_cfg, ctx.layer_map), input_ids, mask, ctx.bf16)


def train_step(ctx: StepContext, batch: dict, device, real: bool = True, accum: int = 1) -> dict[str, float]:
    """One optimizer step; returns the loss and its terms. A non-finite loss raises before the
    weights change, so the last checkpoint stays the last good state.

    Gradient accumulation (`accum` > 1): the batch runs as `accum` passes over parts of its rows
    (dealt out by length, as ranks share a batch), each with the whole batch's denominators, so
    the parts' losses add up to the batch's loss and their gradients to its gradient.

    The values are read from the device once per step, after backward and clipping and before
    `optimizer.step()`: one GPU-to-host sync, where reading each term took six.

    Data parallel (`ctx.parallel`): `batch` is this rank's share of the global batch (`real`
    False: a stand-in row for a rank left without one, which counts for nothing). The loss's
    denominators are the global batch's (all-reduced counts), so each rank's loss is its part of
    the global loss; DDP averages gradients over ranks, so each rank backpropagates its part times
    the world size and the average is the gradient of the global loss. Logged values and the
    finiteness check use the all-reduced (global) loss, so every rank stops together."""
    mask = batch["attention_mask"]
    counts = None
    if ctx.parallel is not None:
        local = LossCounts.of(to_device(mask, device)).stack() * int(real)
        counts = LossCounts.unstack(distributed.all_reduce_sum(local))
    elif accum > 1:
        counts = LossCounts.of(to_device(mask, device))
    parts = micro_batches(batch, accum)
    summed, names = 0, ()
    for i, part in enumerate(parts):
        total, terms = _forward_backward(ctx, part, device, counts, real, sync=i == len(parts) - 1)
        summed = summed + torch.stack([total.detach(), *(v.detach() for v in terms.values())])
        names = tuple(terms)
    if ctx.parallel is not None:
        summed = distributed.all_reduce_sum(summed * int(real))  # the global batch's loss and terms
    if ctx.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(ctx.params, ctx.max_grad_norm)
    loss, *term_values = summed.tolist()  # the step's one device-to-host sync
    values = {"loss": loss, **dict(zip(names, term_values))}
    # Each term's share of the total, so a term that swamps the others (or a starved L_clf) shows.
    weights = ctx.loss_cfg.weights()
    values["share"] = {k: weights[k] * values[k] / loss if loss else 0.0 for k in names}
    if not math.isfinite(loss):
        ctx.optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"the loss became {loss} ({', '.join(f'{k}={values[k]:.4g}' for k in names)})")
    ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return values


def _forward_backward(ctx: StepContext, batch: dict, device, counts: LossCounts | None, real: bool, sync: bool):
    """Forward and backward of one pass; under DDP the gradients are all-reduced on the `sync`
    pass only (the last of the step). Returns the pass's loss and terms (undivided parts of the
    step's loss when `counts` are the whole batch's)."""
    input_ids, mask, labels = (to_device(batch[k], device) for k in ("input_ids", "attention_mask", "labels"))
    teacher_out = teacher_forward(ctx, input_ids, mask, batch.get("index"))
    loss_fn = ctx.loss_fn or forward_loss
    args = (input_ids, mask, labels, teacher_out, ctx.loss_cfg, ctx.layer_map, ctx.bf16, counts)
    if ctx.parallel is None:
        total, terms = loss_fn(ctx.student, ctx.proj, *args)
        total.backward()
        return total, terms
    with contextlib.ExitStack() as stack:
        if not sync:
            stack.enter_context(ctx.parallel.no_sync())
        with distributed.collective("the forward pass"):
            total, terms = ctx.parallel(loss_fn, *args)
        with distributed.collective("the gradient all-reduce"):
            (total * (distributed.world_size() * int(real))).backward()
    return total, terms


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A batch tensor on `device`; to a GPU through pinned memory, without waiting for the copy."""
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def micro_batches(batch: dict, n: int) -> list[dict]:
    """`batch` as `n` parts (gradient accumulation): its rows dealt out by length like the ranks'
    shares (`distributed.share_rows`), each part at the batch's padded length; no empty part."""
    if n == 1:
        return [batch]
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    parts = [distributed.share_rows(lengths, i, n) for i in range(n)]
    return [distributed.take_rows(batch, rows) for rows in parts if rows]


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with transformers' defaults; the fused implementation where PyTorch has one."""
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def linear_schedule(optimizer, total_steps: int, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' `get_linear_schedule_with_warmup`: up from 0 over `warmup_steps`, then
    linearly down to 0 at `total_steps` (the paper: no warm-up)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
