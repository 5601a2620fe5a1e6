"""Where the matching math runs: ``cpu``, ``cuda`` or ``auto`` (docs/DESIGN.md §2, "Devices").

The cost GEMMs, SVDs, eigensolvers, quartics and residual statistics run on the chosen device; every LAP runs on
the CPU (its input is moved there explicitly, just before the solver), and every group element comes back on the
CPU, so applying and writing models never depends on the device.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

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


SIMILARITY_DTYPE_ENV = "SYMMERGE_SIMILARITY_DTYPE"
"""``auto`` (default), ``float32`` or ``bfloat16``: the GEMM dtype of the FFN similarity of bfloat16 checkpoints
(:func:`similarity_dtype`); ``float32`` makes results independent of the CPU they run on."""


@functools.lru_cache(maxsize=1)
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (Intel AMX or AVX512-BF16; Linux ``/proc/cpuinfo`` flags).
    Where it does, torch's bfloat16 GEMM ran 3-5x faster than float32 (700 vs 140-260 GFLOP/s on a 2-core Xeon
    with AMX, benchmarks/results/similarity_dtype.md); where it does not, bfloat16 is emulated and far slower than float32."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16"} & set(flags.split()))


def similarity_dtype(stored: tuple[torch.dtype, ...], device: torch.device) -> torch.dtype:
    """The dtype the FFN similarity GEMMs read: ``bfloat16`` when every tensor is stored in bfloat16 and the
    device is a CPU that multiplies bfloat16 natively (:func:`cpu_has_native_bfloat16`), else ``float32``.

    For bfloat16 checkpoints the inputs are then the stored values themselves and each product is exact; the GEMM
    accumulates in float32 and rounds each output entry once to bfloat16 (8 significant bits: at most 2^-8
    relative) — the only difference from the float32 path, whose products are the same. The LAP then sees a cost
    perturbed by that rounding; its effect on the chosen permutations (share of neurons assigned differently, the
    objective lost) is measured in benchmarks/results/similarity_dtype.md. ``SYMMERGE_SIMILARITY_DTYPE=float32`` (or ``bfloat16``) overrides
    the choice; on CUDA float32 is already fast and is kept."""
    forced = os.environ.get(SIMILARITY_DTYPE_ENV, "auto").strip().lower()
    if forced not in ("auto", "float32", "bfloat16"):
        raise SymmergeError(f"{SIMILARITY_DTYPE_ENV} must be auto, float32 or bfloat16, got {forced!r}")
    if forced != "auto":
        return getattr(torch, forced)
    native = device.type == "cpu" and cpu_has_native_bfloat16()
    return torch.bfloat16 if native and stored and all(d == torch.bfloat16 for d in stored) else torch.float32
