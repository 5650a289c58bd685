"""Data-parallel training across processes and machines: PyTorch's DistributedDataParallel over
torch.distributed, started by torchrun. A process not started by torchrun is a world of one and
every function here is then a no-op (or the identity).

    torchrun --nproc_per_node 2 -m xlmr_mini.train ...

- Process group: `init` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT); nccl on CUDA (one GPU per process: cuda:LOCAL_RANK, or cuda:0 when the launcher
  leaves each process one visible GPU), gloo on CPU. Every
  collective has a timeout (`--dist-timeout`): a rank that dies or hangs makes the others stop
  with `PeerLost` instead of waiting forever (gloo sees a closed connection at once; nccl waits
  for the timeout), and torchrun then stops the job and names the failed rank. Under nccl,
  collectives are asynchronous: the failure surfaces in PyTorch's watchdog thread, which ends
  the process at the timeout, so `PeerLost` (and its "--resume" hint) is seen on gloo only.
- Data: every rank builds the same global batch (the order is a function of the seed alone) and
  takes its share of the rows (`shard_batch`): rows dealt out by length, so ranks get similar
  token counts. Rows keep the global batch's padded length, so TinyBERT's padded means see the
  same positions as on one process.
- Loss: the denominators of the loss's means are all-reduced (`kd_loss.LossCounts`); see
  `kd_step.train_step` for the scaling that makes the gradient the single-process one.
- Evaluation: each rank scores every world-th batch; `all_gather` collects the predictions.
- Files: only rank 0 writes (`on_main` runs a function there and hands its result, or its error,
  to every rank).
"""
import contextlib
import datetime
import inspect
import os

import torch
import torch.distributed as dist

from xlmr_mini.errors import InputError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class PeerLost(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the network broke."""


def launched() -> bool:
    """Started by torchrun (its environment is set)."""
    return all(name in os.environ for name in TORCHRUN_VARS)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device, timeout_s: float) -> tuple[torch.device, bool]:
    """Join torchrun's process group if launched by it and not joined yet; returns (this rank's
    device, whether this call joined, so the caller leaves it in `shutdown`)."""
    if not launched() or active():
        return _local_device(device), False
    if device.type == "cuda":
        device = _local_device(device)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return device, True


def _local_device(device: torch.device) -> torch.device:
    if device.type != "cuda" or not launched():
        return device
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.device_count() == 1:  # a launcher that binds one GPU to each process (Slurm)
        return torch.device("cuda", 0)
    if local >= torch.cuda.device_count():
        raise InputError(f"torchrun: local rank {local} has no GPU of its own ({torch.cuda.device_count()} visible); "
                         f"use --nproc_per_node at most the GPU count")
    return torch.device("cuda", local)


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module) -> torch.nn.Module | None:
    """`module` under DistributedDataParallel, or None on one process. Inputs are already on the
    module's device (no device_ids: DDP moves nothing). Buffers are not re-sent before every
    forward: the only one, `HiddenProjection.index`, never changes."""
    if not active():
        return None
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the switch (and deprecated the old name); 2.11 and 2.12 know the old one.
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    with collective("wrapping the model in DDP"):
        return ddp(module, **{name: False})


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks (a new tensor; `x` itself on one process)."""
    if not active():
        return x
    x = x.detach().clone()
    with collective("all_reduce"):
        dist.all_reduce(x)
    return x


def all_gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    with collective("all_gather"):
        dist.all_gather_object(out, obj)
    return out


def on_main(fn, *args, **kwargs):
    """Run `fn` on rank 0 only (the one that writes files) and return its result there (None on
    the other ranks); an error there is raised on every rank (an InputError stays one, so bad input
    exits 2 everywhere). Every rank waits for it: a barrier."""
    if not active():
        return fn(*args, **kwargs)
    status, result, error = [("ok", "")], None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # re-raised below on rank 0, after the others have its message
            error = e
            status = [("input" if isinstance(e, InputError) else "error", f"{type(e).__name__}: {e}")]
    with collective(f"waiting for rank 0 ({getattr(fn, '__name__', 'a write')})"):
        dist.broadcast_object_list(status, src=0)
    kind, message = status[0]
    if error is not None:
        raise error
    if kind == "input":
        raise InputError(message.split(": ", 1)[1])
    if kind == "error":
        raise RuntimeError(f"rank 0 failed: {message}")
    return result


@contextlib.contextmanager
def collective(what: str):
    """Turn a failed collective into `PeerLost`, with a message that says what happened."""
    try:
        yield
    except (PeerLost, InputError):
        raise
    except Exception as error:
        if not active() or not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and _looks_distributed(error))):
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PeerLost(f"rank {rank()} of {world_size()}: {what} with the other ranks failed ({first}); "
                       f"another rank died or stopped responding") from error


def _looks_distributed(error: BaseException) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def shard_batch(batch: dict) -> tuple[dict, bool]:
    """(this rank's rows of a global batch, whether they are real): the rows `share_rows` gives
    it. A rank left with no row (a last batch smaller than the world) gets the batch's first row to
    run on, marked not real: it counts for nothing (`kd_step.train_step`)."""
    if world_size() == 1:
        return batch, True
    rows = share_rows(batch["attention_mask"].sum(dim=1).tolist(), rank(), world_size())
    return take_rows(batch, rows or [0]), bool(rows)


def take_rows(batch: dict, rows: list[int]) -> dict:
    """These rows of a batch (tensors and lists alike)."""
    index = torch.tensor(rows)
    return {k: v[index] if torch.is_tensor(v) else [v[i] for i in rows] for k, v in batch.items()}


def share_rows(lengths: list[int], rank: int, world: int) -> list[int]:
    """The rows (in batch order) that `rank` of `world` takes from a batch with these lengths:
    sorted longest first and dealt out in a snake order (0 1 1 0 0 1 ...), so the ranks' token
    counts differ by at most one longest row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep batch order

    def seat(i: int) -> int:
        turn, place = divmod(i, world)
        return place if turn % 2 == 0 else world - 1 - place

    return sorted(row for i, row in enumerate(order) if seat(i) == rank)
