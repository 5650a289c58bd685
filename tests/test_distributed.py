"""Training under torchrun: 2 CPU processes (gloo) on the demo give the single-process run, with the
reference KD loss and with the fused kernels; a killed rank stops the job, and --resume finishes
it; batch shares.

The teacher keeps XLM-R's dropout 0.1 and the runs pass --dropout 0 --attention-dropout 0: with
dropout, each process draws masks for its own rows and no run on 2 processes can equal one on 1
process (the condition the README and --help state).
"""
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_demo_model
from xlmr_mini import distributed
from xlmr_mini.distributed import TORCHRUN_VARS, share_rows
from xlmr_mini.errors import InputError
from xlmr_mini.train import main

RUN_TIMEOUT_S = 180  # a hung collective must fail the test, not the CI job


@pytest.fixture(scope="module")
def teacher(cache, tmp_path_factory) -> Path:
    return tiny_demo_model(cache, tmp_path_factory.mktemp("teacher"), hidden=64, heads=4, intermediate=128)


def _args(teacher: Path, cache: Path, out: Path, steps: int, eval_steps: int, device: str = "cpu") -> list[str]:
    # --hidden 32: a narrower student, so the projection trains under DDP too. --device cpu: gloo
    # on CPU processes even on a GPU machine (where auto would pick nccl, one GPU per rank).
    return ["--init", "from-teacher", "--teacher", str(teacher), "--layers", "1", "--hidden", "32",
            "--batch-size", "16", "--max-steps", str(steps), "--eval-steps", str(eval_steps),
            "--cache-dir", str(cache), "--num-threads", "1", "--keep-checkpoint", "--out", str(out), "--dropout", "0",
            "--attention-dropout", "0", "--device", device]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], run_id: str, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", run_id,
           "--local-addr", "127.0.0.1", "--monitor-interval", "1", "-m", "xlmr_mini.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in _records(out) if r["type"] == "train"]


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(a / "checkpoint" / "model.safetensors"), load_file(b / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys() and any(k.startswith("proj.") for k in wa)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=atol, rtol=1e-4, msg=key)


@pytest.mark.parametrize("impl, accum, extra", [("reference", 1, []), ("reference", 3, []), ("fused", 1, []),
                                                ("reference", 1, ["--recompute"])],
                         ids=["one-pass", "grad-accum", "fused", "recompute"])
def test_two_processes_train_the_one_process_weights(teacher, cache, tmp_path, impl, accum, extra):
    """Also with --grad-accum: each process runs its share in passes, gradients all-reduced once.
    Fused: the kernels (interpreted on CPU) divide by the global batch's counts too. --recompute:
    DDP's all-reduce with the layers run again in the backward pass."""
    impl_args = ["--kd-impl", impl] + (["--max-length", "24"] if impl == "fused" else [])  # interpreted: short rows
    main(_args(teacher, cache, tmp_path / "one", 6, 3) + impl_args)
    two_args = _args(teacher, cache, tmp_path / "two", 6, 3) + impl_args + ["--grad-accum", str(accum)] + extra
    code, out = _finish(_torchrun(two_args, uuid.uuid4().hex))
    assert code == 0, out[-3000:]
    _assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-6)
    two = [r for r in _records(tmp_path / "two") if r["type"] == "train"]
    one = [r for r in _records(tmp_path / "one") if r["type"] == "train"]
    assert [r["step"] for r in two] == list(range(1, 7))  # one line per step: rank 0 alone writes
    assert all(r["world_size"] == 2 and r["samples_per_s"] > 0 for r in two)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["steps"] == 6 and (tmp_path / "two" / "best" / "model.safetensors").is_file()
    assert results["kd_impl"] == {"asked": impl, "used": impl}
    assert out.count("wrote ") == 1  # only rank 0 prints the summary


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl: needs 2 GPUs, one per process")
def test_two_gpu_processes_over_nccl_train_the_one_gpu_weights(teacher, cache, tmp_path):
    main(_args(teacher, cache, tmp_path / "one", 6, 3, device="cuda"))
    code, out = _finish(_torchrun(_args(teacher, cache, tmp_path / "two", 6, 3, device="cuda"), uuid.uuid4().hex))
    assert code == 0, out[-3000:]
    _assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)  # GPU reductions: another order
    two = [r for r in _records(tmp_path / "two") if r["type"] == "train"]
    one = [r for r in _records(tmp_path / "one") if r["type"] == "train"]
    assert [r["step"] for r in two] == list(range(1, 7)) and all(r["world_size"] == 2 for r in two)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)


def _worker_pid(run_id: str, rank: int) -> int | None:
    """The pid of torchrun run `run_id`'s worker `rank` (found by its environment)."""
    wanted = {f"TORCHELASTIC_RUN_ID={run_id}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except (OSError, ValueError):
            continue
        if wanted <= env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker to kill through /proc")
def test_killed_rank_stops_the_job_and_resume_finishes_it(teacher, cache, tmp_path):
    steps = 60
    main(_args(teacher, cache, tmp_path / "one", steps, 10))
    out = tmp_path / "two"
    run_id = uuid.uuid4().hex
    proc = _torchrun(_args(teacher, cache, out, steps, 10), run_id)
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline and proc.poll() is None:  # kill rank 1 once step 10's checkpoint is written
        if (out / "checkpoint" / "progress.json").is_file() and (out / "metrics.jsonl").is_file() \
                and max(_train_steps(out), default=0) > 10:
            break
        time.sleep(0.01)
    victim = _worker_pid(run_id, 1)
    assert proc.poll() is None and victim is not None, "the run ended before rank 1 could be killed"
    os.kill(victim, 9)
    killed_at = time.time()
    code, printed = _finish(proc, timeout=60)
    assert code != 0 and time.time() - killed_at < 30
    assert "rank      : 1" in printed and "SIGKILL" in printed  # torchrun names the failed rank
    assert "rank 0 of 2" in printed and "--resume" in printed  # the survivor says what happened
    stopped = json.loads((out / "checkpoint" / "progress.json").read_text())["step"]
    assert 10 <= stopped < steps

    code, printed = _finish(_torchrun(_args(teacher, cache, out, steps, 10) + ["--resume"], uuid.uuid4().hex))
    assert code == 0, printed[-3000:]
    assert _train_steps(out) == list(range(1, steps + 1))
    _assert_same_weights(tmp_path / "one", out, atol=1e-5)


def test_batch_shares_cover_every_row_once_with_similar_token_counts():
    lengths = [5, 30, 7, 22, 9, 9, 41, 3, 18, 12, 27]
    for world in (2, 3, 4, 8):
        shares = [share_rows(lengths, r, world) for r in range(world)]
        assert sorted(row for s in shares for row in s) == list(range(len(lengths)))
        tokens = [sum(lengths[i] for i in s) for s in shares]
        assert max(tokens) - min(tokens) <= max(lengths), (world, tokens)
    assert [share_rows([4, 6], r, 4) for r in range(4)] == [[1], [0], [], []]  # a short last batch


def _torchrun_env(monkeypatch, local_rank: int, gpus: int) -> None:
    for name, value in zip(TORCHRUN_VARS, ("1", "2", str(local_rank), "127.0.0.1", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


@pytest.mark.parametrize("local_rank, gpus, expected", [(1, 1, "cuda:0"), (0, 1, "cuda:0"), (1, 2, "cuda:1"),
                                                        (3, 8, "cuda:3")])
def test_each_rank_takes_its_local_gpu_or_the_one_it_was_given(monkeypatch, local_rank, gpus, expected):
    """One visible GPU per process (Slurm's per-task binding) is that process's GPU, whatever
    its local rank; with several visible, local rank N takes cuda:N."""
    _torchrun_env(monkeypatch, local_rank, gpus)
    assert distributed._local_device(torch.device("cuda")) == torch.device(expected)


def test_a_local_rank_beyond_several_visible_gpus_is_bad_input(monkeypatch):
    _torchrun_env(monkeypatch, 2, 2)
    with pytest.raises(InputError, match="local rank 2 has no GPU of its own \\(2 visible\\)"):
        distributed._local_device(torch.device("cuda"))
