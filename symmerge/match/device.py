"""Where the matching math runs: ``cpu``, ``cuda`` or ``auto`` (docs/DESIGN.md §2, "Devices").

The cost GEMMs, SVDs, eigensolvers, quartics and residual statistics run on the chosen device; every LAP runs on
the CPU (its input is moved there explicitly, just before the solver), and every group element comes back on the
CPU, so applying and writing models never depends on the device.
"""

from __future__ import annotations

import torch

from symmerge.errors import SymmergeError

DEVICES = ("cpu", "cuda", "auto")
CPU = torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"cpu"`` → the CPU; ``"auto"`` → ``cuda`` if a CUDA device is available, else the CPU;
    ``"cuda"`` (or ``"cuda:N"``) → that device, or a one-line error when there is none."""
    if device is None:
        return CPU
    name = device.type if isinstance(device, torch.device) and device.index is None else str(device)
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    if name == "cpu":
        return CPU
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SymmergeError(f"--device {name}: no CUDA device is available")
        return torch.device(name)
    raise SymmergeError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
