"""Devices: resolve `--device auto|cpu|cuda[:N]` to a torch.device, with one clear error."""
import torch

from xlmr_mini.errors import InputError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)
