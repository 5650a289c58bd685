"""`--kd-impl auto` and `--compile auto`: resolved per device, self-checked on the first batch with a
fallback on a mismatch or an exception, cached, recorded in results.json. On CPU the device is
told it qualifies (monkeypatch) and the fused kernels run through Triton's interpreter."""
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_demo_model
from xlmr_mini import kd_loss, run_setup, step_impl
from xlmr_mini.kd_step import compile_forward_loss
from xlmr_mini.step_impl import plan_step
from xlmr_mini.train import main


@pytest.fixture(scope="module")
def teacher(cache, tmp_path_factory) -> Path:
    # Dropout 0.1: a self-check that left the student in eval mode or drew random numbers would
    # change the run.
    return tiny_demo_model(cache, tmp_path_factory.mktemp("teacher"), hidden=64, heads=4, intermediate=128)


@pytest.fixture
def fresh_check(cache):
    """No cached self-check outcome from an earlier test (each injects its own failure)."""
    for path in (cache / "hardware").glob("kd-step-check-*.json"):
        path.unlink()


def _run(teacher: Path, cache: Path, out: Path, *flags: str) -> tuple[dict, list[float]]:
    # Short batches: the interpreted kernels run a Python loop per program.
    main(["--init", "from-teacher", "--teacher", str(teacher), "--layers", "1", "--hidden", "32", "--max-steps", "2",
          "--batch-size", "8", "--max-length", "24", "--cache-dir", str(cache), "--num-threads", "1", "--out", str(out),
          *flags])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    return json.loads((out / "results.json").read_text()), losses


def test_auto_resolves_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on_cpu = plan_step("auto", "auto", cpu, True, "masked")
    # --compile auto is a candidate everywhere until the first batch's measurement decides it.
    assert (on_cpu.kd_impl, on_cpu.compiled, on_cpu.check_fused, on_cpu.check_compiled) == ("reference", True, False,
                                                                                            True)
    on_gpu = plan_step("auto", "auto", cuda, True, "masked")
    assert (on_gpu.kd_impl, on_gpu.compiled, on_gpu.check_fused, on_gpu.check_compiled) == ("fused", True, True, True)
    assert plan_step("auto", "auto", cuda, True, "tinybert").kd_impl == "reference"  # the kernels' norm is masked
    assert plan_step("auto", "auto", cuda, False, "masked").kd_impl == "reference"  # no KD, no KD loss
    explicit = plan_step("fused", "off", cuda, True, "masked")
    assert (explicit.kd_impl, explicit.compiled, explicit.check_fused, explicit.check_compiled) == ("fused", False,
                                                                                                   False, False)
    on = plan_step("reference", "on", cpu, True, "masked")
    assert on.compiled and not on.check_compiled
    assert plan_step("reference", "off", cpu, True, "masked").record() == {
        "kd_impl": {"asked": "reference", "used": "reference"}, "compile": {"asked": "off", "used": False}}


def test_auto_selects_fused_where_the_device_qualifies_and_caches_the_check(teacher, cache, tmp_path, monkeypatch,
                                                                            capsys, fresh_check):
    monkeypatch.setattr(step_impl, "fused_device", lambda device: True)
    results, losses = _run(teacher, cache, tmp_path / "a")
    check = results["step_check"]
    assert results["kd_impl"]["asked"] == "auto" and results["kd_impl"]["used"] == "fused"
    assert check["fused"]["ok"] and not check["fused"]["cached"] and check["precision"] == "fp32"
    assert (check["atol"], check["rtol"]) == step_impl.TOLERANCES["fp32"]
    # Two steps of a tiny model: far too short for a compile to pay back, so not even probed.
    assert results["compile"] == {"asked": "auto", "used": False}
    detail = check["compiled"]["detail"]
    assert detail.startswith("not probed: the run's 2 steps take ~") and detail.endswith("too few for a compile to "
                                                                                         "pay back"), detail
    assert "--kd-impl auto" not in capsys.readouterr().out
    # The fused run is the reference run within float rounding (same dropout draws: the check drew none).
    _, reference = _run(teacher, cache, tmp_path / "r", "--kd-impl", "reference")
    assert losses == pytest.approx(reference, rel=1e-5)

    monkeypatch.setattr(step_impl._Probe, "compare", lambda *a: pytest.fail("checked again"))
    again, _ = _run(teacher, cache, tmp_path / "b")
    assert again["kd_impl"]["used"] == "fused" and again["step_check"]["fused"]["cached"]


def _off_by(offset: float, fn):
    return lambda *args: fn(*args) + offset


def _failing(*args):
    raise RuntimeError("injected kernel failure")


@pytest.mark.parametrize("inject,said", [
    (_off_by(0.01, kd_loss.attention_prob_mse), "the fused KD loss differs from the reference: att "),
    (_failing, "the fused KD loss failed (RuntimeError: injected kernel failure) on the first batch"),
])
def test_auto_falls_back_to_the_reference_on_a_mismatch_or_an_exception(inject, said, teacher, cache, tmp_path,
                                                                       monkeypatch, capsys, fresh_check):
    monkeypatch.setattr(step_impl, "fused_device", lambda device: True)
    monkeypatch.setattr(kd_loss, "attention_prob_mse", inject)
    results, losses = _run(teacher, cache, tmp_path / "a")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--kd-impl auto")]
    assert len(printed) == 1 and said in printed[0] and "(fp32, atol 1e-05, rtol 0.001)" in printed[0]
    assert printed[0].endswith("training with the reference")
    assert results["kd_impl"]["used"] == "reference" and not results["step_check"]["fused"]["ok"]
    monkeypatch.undo()
    _, reference = _run(teacher, cache, tmp_path / "r", "--kd-impl", "reference")
    assert losses == reference  # the fallback is the reference run, bit for bit


@pytest.fixture
def probed(monkeypatch, fresh_check, cache):
    """--compile auto probes even the tests' short runs; aot_eager (dynamo and autograd tracing as
    inductor, without its C++ build, slow on 2 cores) compiles."""
    for path in (cache / "hardware").glob("compile-probe-*.json"):
        path.unlink()
    monkeypatch.setattr(step_impl, "MIN_PROBED_S", 0.0)
    monkeypatch.setattr(run_setup, "compile_forward_loss", lambda: compile_forward_loss("aot_eager"))


def test_auto_compile_is_checked_against_eager_and_falls_back(teacher, cache, tmp_path, monkeypatch, capsys, probed):
    monkeypatch.setattr(step_impl, "MIN_SPEEDUP", 0.0)  # whatever it measures, it pays
    monkeypatch.setattr(step_impl, "PAYBACK", -float("inf"))
    monkeypatch.setattr(step_impl, "fused_device", lambda device: True)
    results, _ = _run(teacher, cache, tmp_path / "a")
    check = results["step_check"]
    assert results["compile"] == {"asked": "auto", "used": True} and results["kd_impl"]["used"] == "fused"
    assert check["fused"]["ok"] and check["compiled"]["ok"] and check["compiled"]["pays"], check
    assert check["compiled"]["compile_s"] >= 0 and check["compiled"]["speedup"] > 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("--compile auto: on (")]

    def broken_compile():
        def loss_fn(*args):
            raise RuntimeError("injected compile error")
        return loss_fn

    monkeypatch.setattr(run_setup, "compile_forward_loss", broken_compile)
    results, losses = _run(teacher, cache, tmp_path / "b", "--kd-impl", "reference")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--compile auto")]
    assert len(printed) == 1 and "the compiled step failed (RuntimeError: injected compile error)" in printed[0]
    assert printed[0].endswith("training with eager")
    assert results["compile"] == {"asked": "auto", "used": False} and len(losses) == 2
    assert results["kd_impl"] == {"asked": "reference", "used": "reference"}


@pytest.mark.parametrize("speedup,compile_s,used", [(1.5, 1.0, True), (1.05, 0.0, False), (2.0, 1e9, False)])
def test_auto_compiles_where_the_measured_saving_pays_back_the_compile(speedup, compile_s, used, teacher, cache,
                                                                       tmp_path, monkeypatch, capsys, probed):
    """The decision from the measurement: faster by MIN_SPEEDUP, and saving PAYBACK compiles over the
    run's steps. The probe's numbers are cached; a second run decides from them without compiling."""
    monkeypatch.setattr(step_impl._Probe, "time", lambda self, impl, fn, repeats=2: 10.0)  # 2 steps: 20 s eager
    monkeypatch.setattr(step_impl._Probe, "time_compiled", lambda self, impl, fn, eager_s, atol, rtol: {
        "ok": True, "detail": "matches the reference", "compiled_s": eager_s / speedup, "speedup": speedup,
        "compile_s": compile_s})
    results, _ = _run(teacher, cache, tmp_path / "a")
    assert results["compile"] == {"asked": "auto", "used": used}
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--compile auto")]
    saving = 20 * (1 - 1 / speedup)
    assert printed == [f"--compile auto: {'on' if used else 'off'} (the compiled step ran {speedup:.2f}x eager on the "
                       f"first batch and compiles in ~{compile_s:,.0f} s; over the run's 2 steps it would save "
                       f"~{saving:,.0f} s)"]
    monkeypatch.setattr(step_impl._Probe, "time_compiled", lambda *a: pytest.fail("probed again"))
    again, _ = _run(teacher, cache, tmp_path / "b")
    assert again["compile"]["used"] == used and again["step_check"]["compiled"]["cached"]
