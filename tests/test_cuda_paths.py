"""Branches that run only on CUDA, checked on CPU with stand-ins: device counts and
`CUDA_VISIBLE_DEVICES` monkeypatched, tensors that report a GPU device, recorded launches and
CUDA calls. What needs a real GPU runs where one is present: the compiled kernels
(test_kernels.py, test_kd_loss.py) and nccl across two GPUs (test_distributed.py)."""
import contextlib
import json
import math

import pytest
import torch
import torch.distributed as dist

from conftest import padded_batch
from xlmr_mini import distributed, run_dir, study, study_estimate
from xlmr_mini.checkpoint import save_model
from xlmr_mini.config import XLMRConfig
from xlmr_mini.copy_weights import StudentSpec
from xlmr_mini.kd_loss import HiddenProjection, KDLossConfig, LossCounts
from xlmr_mini.kd_step import StepContext, Trained, TrainingError, forward_loss, linear_schedule, make_optimizer, \
    to_device, train_step
from xlmr_mini.kernels import _dispatch
from xlmr_mini.model import XLMRClassifier, init_weights
from xlmr_mini.step_impl import plan_step
from xlmr_mini.study_plan import Planner, StudySettings, plan_runs
from xlmr_mini.train_config import TrainConfig


class _OnGPU1(torch.Tensor):
    """A meta tensor that reports cuda:1, standing in for a tensor on the second GPU."""

    @property
    def device(self):
        return torch.device("cuda", 1)


@pytest.fixture
def current_gpu(monkeypatch) -> list:
    """A stand-in for `torch.cuda.device`: the last item is the current GPU (cuda:0 at first)."""
    current = [torch.device("cuda", 0)]

    @contextlib.contextmanager
    def device(d):
        current.append(torch.device(d))
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    return current


# ---------------------------------------------------------------------------------------------
# Kernel launches
# ---------------------------------------------------------------------------------------------
def test_a_kernel_launches_on_its_inputs_gpu_not_the_current_one(current_gpu):
    """Triton starts a kernel on the current device; under --device cuda:1 the inputs are on
    cuda:1 while cuda:0 is current, so `launch` makes the inputs' device current around it."""
    launched_on = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched_on.append(current_gpu[-1])

    config = _dispatch.LaunchConfig(grid=(1,))
    _dispatch.launch(Kernel(), config, 7, torch.empty(2, device="meta").as_subclass(_OnGPU1))
    _dispatch.launch(Kernel(), config, torch.empty(2))  # CPU (the interpreter): no device to make current
    assert launched_on == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert current_gpu == [torch.device("cuda", 0)]  # restored after the launch


# ---------------------------------------------------------------------------------------------
# Checkpointed RNG state
# ---------------------------------------------------------------------------------------------
def test_rng_state_holds_the_run_gpus_generator_only(monkeypatch):
    """Saved under torchrun on 8 GPUs (rank 3 on cuda:3), resumed on a machine with one: only
    the run's own GPU generator is saved and restored, so nothing indexes GPUs that are gone."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or
                        torch.tensor([3], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", state.tolist(), device)))
    for name in ("get_rng_state_all", "set_rng_state_all"):  # every visible GPU's: what broke resumes
        monkeypatch.setattr(torch.cuda, name, lambda *a: pytest.fail(f"torch.cuda.{name} called"))
    state = run_dir.rng_state(torch.device("cuda", 3))
    run_dir.restore_rng(state, torch.device("cuda", 0))
    assert calls == [("get", torch.device("cuda", 3)), ("set", [3], torch.device("cuda", 0))]
    assert "cuda" not in run_dir.rng_state(torch.device("cpu"))
    run_dir.restore_rng(state, torch.device("cpu"))  # a GPU run resumed on CPU: the CPU state alone
    assert len(calls) == 2 and torch.equal(torch.get_rng_state(), state["torch"])


# ---------------------------------------------------------------------------------------------
# study --jobs: one GPU per worker
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("visible, gpus, jobs, expected", [
    ("4,5,6,7", 4, 6, ["4", "5", "6", "7", "4", "5"]),
    ("GPU-a1b2, GPU-c3d4", 2, 2, ["GPU-a1b2", "GPU-c3d4"]),
    ("2,3,9", 2, 3, ["2", "3", "2"]),  # CUDA ignores the entries after an invalid one
    (None, 3, 4, ["0", "1", "2", "0"]),
    ("", 0, 2, [None, None]),
])
def test_study_workers_get_the_parents_visible_gpus(monkeypatch, visible, gpus, jobs, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert study.worker_gpus(jobs) == expected


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------
def test_ddp_does_not_resend_buffers_every_step(tmp_path):
    """HiddenProjection.index never changes: DDP's per-step buffer broadcast is off (a real
    one-process gloo group)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = distributed.wrap(Trained(_tiny(1, 32, 0), HiddenProjection(32, 64, "select")))
        assert ddp is not None and not ddp.will_sync_module_buffers()
    finally:
        dist.destroy_process_group()


def test_loss_counts_are_made_on_the_masks_device_without_host_data(monkeypatch):
    """Under DDP the counts are computed every step: none may be built from host data (each such
    tensor is a host-to-device copy on a GPU)."""
    def host_data(*args, **kwargs):
        raise AssertionError("a tensor built from host data")

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    monkeypatch.setattr(torch.Tensor, "new_tensor", host_data)
    monkeypatch.setattr(torch, "tensor", host_data)
    assert LossCounts.of(mask).stack().tolist() == [2, 3, 5, 6, 18]


# ---------------------------------------------------------------------------------------------
# The training step: syncs, non-finite losses, batch copies
# ---------------------------------------------------------------------------------------------
def _tiny(layers: int, hidden: int, seed: int) -> XLMRClassifier:
    cfg = XLMRConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=40, id2label=("a", "b", "c"))
    torch.manual_seed(seed)
    model = XLMRClassifier(cfg)
    init_weights(model, 0.2)
    return model


def _context(loss_fn=None) -> StepContext:
    teacher, student = _tiny(2, 64, 0).eval().requires_grad_(False), _tiny(1, 32, 1).train()
    proj = HiddenProjection(32, 64)
    params = list(student.parameters()) + list(proj.parameters())
    optimizer = make_optimizer(params, 1e-3, 0.01)
    return StepContext(student=student, teacher=teacher, proj=proj, loss_cfg=KDLossConfig(), layer_map=[1],
                       optimizer=optimizer, scheduler=linear_schedule(optimizer, 10), params=params,
                       loss_fn=loss_fn)


def _batch() -> dict:
    ids, mask = padded_batch(40, [7, 4, 5])
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}


SYNCING = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def test_a_step_reads_the_device_once(monkeypatch):
    """Every way a tensor's value reaches the host (a GPU-to-host sync on CUDA), counted over one
    KD step: one, after backward and clipping."""
    ctx = _context()
    train_step(ctx, _batch(), "cpu")  # a first step apart: AdamW builds its state
    reads = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k:
                            reads.append(_n) or _f(self, *a, **k))
    values = train_step(ctx, _batch(), "cpu")
    monkeypatch.undo()
    assert reads == ["tolist"]
    assert set(values) == {"loss", "att", "hid", "embd", "pred", "clf", "share"} and math.isfinite(values["loss"])


def test_a_non_finite_loss_leaves_weights_and_optimizer_untouched():
    def poisoned(*args):
        total, terms = forward_loss(*args)
        return total * float("inf"), terms

    ctx = _context()
    train_step(ctx, _batch(), "cpu")
    ctx.loss_fn = poisoned
    before = {k: v.clone() for k, v in ctx.student.state_dict().items()}
    moments = [ctx.optimizer.state[p]["exp_avg"].clone() for p in ctx.params]
    with pytest.raises(TrainingError, match="the loss became (inf|nan)"):
        train_step(ctx, _batch(), "cpu")
    assert all(torch.equal(before[k], v) for k, v in ctx.student.state_dict().items())
    assert all(torch.equal(m, ctx.optimizer.state[p]["exp_avg"]) for m, p in zip(moments, ctx.params))
    assert all(p.grad is None for p in ctx.params) and ctx.scheduler.last_epoch == 1


def test_batches_go_to_a_gpu_from_pinned_memory_without_waiting(monkeypatch):
    moves = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: moves.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, **kw: moves.append((str(device), kw)) or self)
    x = torch.zeros(2)
    to_device(x, torch.device("cuda", 1))
    to_device(x, "cpu")
    assert moves == ["pin", ("cuda:1", {"non_blocking": True}), ("cpu", {})]


# ---------------------------------------------------------------------------------------------
# study --dry-run's step timing
# ---------------------------------------------------------------------------------------------
def test_study_estimate_waits_for_the_gpu_before_reading_the_clock(monkeypatch):
    events = []
    monkeypatch.setattr(study_estimate, "train_step", lambda ctx, batch, device: events.append("step"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(study_estimate.time, "perf_counter", lambda: events.append("clock") or 0.0)
    study_estimate._seconds(None, {}, torch.device("cuda"))
    assert events == ["step", "sync", "clock"] + ["step"] * study_estimate.PROBE_STEPS + ["sync", "clock"]


def test_study_estimate_times_steps_in_the_runs_precision():
    """A run in bf16 is timed in bf16, with the teacher's linears stored in bf16 as training does."""
    teacher_cfg = _tiny(2, 64, 0).cfg
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        ctx = study_estimate._context(TrainConfig(precision=precision), teacher_cfg, StudentSpec(layers=1), True,
                                      torch.device("cpu"))
        assert ctx.bf16 == (precision == "bf16") and ctx.teacher.layers[0].attn.q.weight.dtype == dtype


# ---------------------------------------------------------------------------------------------
# bench.kd_step's labels
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["xlmr_mini", "xlmr_mini-fused"])
def test_kd_step_bench_rows_say_which_kd_loss_ran(impl, capsys, monkeypatch):
    """The default row runs training's default --kd-impl (on a GPU too) and says so; the fused
    row says whether the kernels or their PyTorch fallback ran."""
    from bench import kd_step as bench_kd_step

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU without the interpreter: the fallback
    ran = []
    def step(args, t, s, device, precision, trimmed, compiled, loss_impl, cached=False, pad=False, recompute=False):
        ran.append(loss_impl)  # what the row asked for, planned as training plans it (no self-check here)
        return (lambda: None), "fp32", plan_step(loss_impl, "off", torch.device("cpu"), True, "masked")

    monkeypatch.setattr(bench_kd_step, "xlmr_mini_step", step)
    monkeypatch.setattr(bench_kd_step, "measure", lambda *a, **k: type("M", (), dict(
        rate=1.0, median_s=1.0, spread_s=0.0, peak_mem_mb=1.0))())
    bench_kd_step.main(["--quick", "--one", impl, "--student-hidden", "384", "--seq", "16"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = TrainConfig().kd_impl if impl == "xlmr_mini" else "fused"
    assert ran == [want]
    # auto runs the reference on a CPU; the fused row names the fallback that ran in its place
    assert row["kd_impl"] == ("reference" if want == "auto" else "fused (PyTorch fallback)")


def test_study_passes_deterministic_to_every_run_without_changing_its_identity(tmp_path):
    """`study --deterministic` (for reruns that repeat on a GPU) reaches every training run's
    flags, and a run keeps its directory: determinism is not part of what a run computes."""
    args = study._parser().parse_args(["table2", "--deterministic"])
    assert args.deterministic is True and study._parser().parse_args(["table2"]).deterministic is None
    base = save_model(tmp_path / "base", _tiny(2, 64, 0))
    runs = {}
    for switch in ((), (("deterministic", True),)):
        settings = StudySettings(data="demo", base=str(base), seeds=(1,), out=tmp_path,
                                 overrides=(("cache-dir", str(tmp_path / "cache")), *switch))
        runs[switch] = plan_runs(["table2"], Planner(settings, 2, 64))
    plain, det = runs.values()
    assert plain.keys() == det.keys()
    assert all("--deterministic" in r.argv for r in det.values() if r.tool == "train")
    assert not any("--deterministic" in r.argv for r in plain.values())
