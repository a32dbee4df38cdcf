"""Which device a run uses, and a one-line description of it (for results files and the CLI)."""
from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when a CUDA GPU is visible, else cpu; "cpu"; "cuda" (ValueError naming the knob when no
    GPU is visible or the name is unknown)."""
    if name not in DEVICES:
        raise ValueError(f"device: must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    return torch.device(name)


def describe_device(device: torch.device | str) -> dict:
    """{"device": name, "torch": version, "cuda": version or None, "capability": "9.0" or None}."""
    device = torch.device(device)
    out = {"device": "cpu", "torch": torch.__version__, "cuda": None, "capability": None}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        out.update(device=torch.cuda.get_device_name(idx), cuda=torch.version.cuda, capability=f"{major}.{minor}")
    return out
