"""`python -m bench.gpu_check --cpu-smoke`: the GPU acceptance command's plumbing on CPU (tiny
shapes, Triton's interpreter), so it does not rot while no GPU is at hand."""
import json

from bench import gpu_check


def test_cpu_smoke_writes_every_section_to_json_and_markdown(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--cpu-smoke"]) == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == [name for name, _ in gpu_check.SECTIONS] and report["ok"] and report["cpu_smoke"]
    assert all(s["ok"] and s["error"] is None for s in sections.values())
    errors = sections["fused vs reference"]["rows"]
    assert {(r["kernel"], r["precision"]) for r in errors} == {
        (k, p) for k in ("layer MSE", "attention probs MSE", "attention scores MSE") for p in ("fp32", "bf16")}
    assert all(r["grad_max_error_rel_to_largest"] <= r["atol"] + r["rtol"] for r in errors)
    assert all(r["measured_us"] > 0 and r["achieved_GB_s"] > 0 for r in sections["kernel bandwidth"]["rows"])
    step = {r["implementation"]: r for r in sections["KD step"]["rows"]}
    assert step.keys() == {"transformers-bf16", "transformers-bf16-trimmed", "xlmr_mini", "xlmr_mini-cached",
                           "transformers-bf16-trimmed-recompute", "xlmr_mini-cached-recompute"}
    assert all(r["samples_per_s"] > 0 for r in step.values())
    assert step["xlmr_mini"]["step_impl"]["kd_impl"] == {"asked": "auto", "used": "reference"}  # CPU: the reference
    assert sections["self-check"]["rows"][0]["kd_impl"]["used"] == "reference"
    assert any("train" in line for line in sections["study dry run"]["rows"][0]["output_tail"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# GPU check: all passed") and all(f"## {name}: passed" in md for name in sections)


def test_mfu_counts_the_teacher_forward_and_the_student_forward_and_backward():
    t, s = dict(layers=12, hidden=768, inter=3072), dict(layers=6, hidden=384, inter=1536)
    per_token = 2 * 12 * (4 * 768**2 + 2 * 768 * 3072) + 6 * 6 * (4 * 384**2 + 2 * 384 * 1536)
    assert gpu_check.model_flops(384, 8, 64, t, s) == 8 * 64 * per_token
    assert gpu_check.bf16_peak("NVIDIA H200") == 989e12 and gpu_check.bf16_peak("CPU") is None
