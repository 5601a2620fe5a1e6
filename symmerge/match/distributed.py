"""Per-layer fits as Ray tasks, on one machine or a cluster (docs/DESIGN.md §2, "Devices and clusters").

One task per FFN group (similarity GEMM + exact LAP) and per attention group (head assignment, Procrustes,
quartics), for every model at once. A task reads its own tensors: from the checkpoint's safetensors files (the
driver sends paths and tensor names; every node must be able to read the path) when the state is file-backed, or
from Ray's object store when it lives in memory (a folded or rotated state of the residual descent: each group's
tensors are put there once). A task returns only the group element. The functions the tasks run are the ones the
single-process path runs (:func:`~symmerge.match.per_layer.ffn_group_similarity`, :func:`~symmerge.match.per_layer.solve_ffn`,
:func:`~symmerge.match.per_layer.fit_attention_group`), so the result is identical.

Ray is optional (``pip install 'symmerge[ray]'``); nothing imports this module when importing symmerge, so Ray's
import cost is paid only by runs that use it (the CLI imports it for ``--ray``; API users pass a
:class:`RayExecutor` as ``align(..., ray=RayExecutor("auto"))``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from symmerge.errors import SymmergeError
from symmerge.groups import HeadTransform, ModelTransform
from symmerge.io.checkpoint import all_finite
from symmerge.match.device import resolve_device
from symmerge.match.fit import Fit
from symmerge.match.per_layer import ATTENTION_CLASSES, ffn_details, ffn_group_similarity, fit_attention_group, solve_ffn
from symmerge.spec import AttentionGroup, FFNGroup, ModelSpec, StateView

try:
    import ray
except ImportError:  # pragma: no cover - exercised only without the ray extra
    ray = None

INSTALL_HINT = "--ray needs Ray: pip install 'symmerge[ray]'"


@dataclass(frozen=True)
class TensorFiles:
    """Where some tensors are stored: tensor name → safetensors file (an absolute path every node can read)."""

    files: dict[str, str]

    def read(self) -> dict[str, torch.Tensor]:
        """Every tensor named, read with ``safe_open`` (one open per file), rejecting NaN/Inf as loading does."""
        by_file: dict[str, list[str]] = {}
        for key, path in self.files.items():
            by_file.setdefault(path, []).append(key)
        out = {}
        for path, keys in by_file.items():
            with safe_open(path, "pt") as handle:
                for key in keys:
                    out[key] = handle.get_tensor(key)
        for key, t in out.items():
            if not all_finite(t):
                raise SymmergeError(f"{self.files[key]}: tensor {key!r} holds NaN or Inf values")
        return out


Source = TensorFiles | Mapping[str, torch.Tensor]


def read_source(source: Source) -> dict[str, torch.Tensor]:
    return source.read() if isinstance(source, TensorFiles) else dict(source)


def ffn_task(reference: Source, model: Source, group: FFNGroup, device: str) -> tuple[torch.Tensor, float]:
    """A Ray task's body (a plain function: tested without Ray): one FFN's permutation and its objective decrease."""
    similarity = ffn_group_similarity(StateView(read_source(reference)), StateView(read_source(model)), group, torch.device(device))
    return solve_ffn(similarity, group.width)


def attention_task(reference: Source, model: Source, group: AttentionGroup, symmetries: frozenset[str],
                   device: str) -> tuple[HeadTransform, dict]:
    """A Ray task's body: one attention layer's :class:`HeadTransform` (on the CPU) and its details."""
    return fit_attention_group(StateView(read_source(reference)), StateView(read_source(model)), group, symmetries, torch.device(device))


def group_keys(group: FFNGroup | AttentionGroup) -> list[str]:
    return sorted({s.key for s in group.slots()})


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A cluster address (``HOST:PORT`` or ``ray://HOST:PORT``) must accept a TCP connection within ``timeout``
    seconds, or a one-line error: Ray's own connect retries for minutes where nothing listens. ``auto`` and
    ``local`` are Ray's to resolve."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SymmergeError(f"--ray {address}: give auto, local or HOST:PORT (a cluster head, e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise SymmergeError(f"--ray {address}: cannot reach {host}:{port} ({reason}); is the cluster's head "
                            "started (`ray start --head`)?") from None


class RayExecutor:
    """Fans per-layer fits out as Ray tasks. ``address``: ``"auto"`` (the cluster this machine joined with
    ``ray start``), ``"HOST:6379"`` (a cluster's head), or ``"local"`` (start a Ray instance in this process;
    ``num_cpus`` bounds it). With a CUDA device each task asks for ``gpus_per_task`` of a GPU."""

    def __init__(self, address: str = "auto", *, num_cpus: int | None = None, gpus_per_task: float = 0.25):
        if ray is None:
            raise SymmergeError(INSTALL_HINT)
        self.address = address
        self.gpus_per_task = gpus_per_task
        if not ray.is_initialized():
            check_reachable(address)
            try:
                if address == "local":
                    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
                else:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise SymmergeError(f"--ray {address}: cannot connect to a Ray cluster ({first})") from None
        self._ffn = ray.remote(num_cpus=1)(ffn_task)
        self._attention = ray.remote(num_cpus=1)(attention_task)
        self._puts: dict[int, tuple[Mapping, dict[str, Any]]] = {}  # id(state) → (state, group name → object ref)

    def resolve_device(self, device: str | torch.device | None) -> torch.device:
        """``auto`` means cuda when the *cluster* has GPUs (the driver may have none); ``cuda`` needs one there."""
        name = "cpu" if device is None else str(device)
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        if name == "auto":
            return torch.device("cuda" if has_gpu else "cpu")
        if name.startswith("cuda") and not has_gpu:
            raise SymmergeError(f"--device {name}: the Ray cluster has no GPU")
        return torch.device(name) if name.startswith("cuda") else resolve_device(name)

    def _source(self, state: Mapping[str, torch.Tensor], group: FFNGroup | AttentionGroup) -> Any:
        """What a task reads one group's tensors from: file paths when ``state`` is file-backed, else an object
        reference (each group's tensors of an in-memory state are put into the object store once)."""
        keys = group_keys(group)
        files = state.tensor_files() if hasattr(state, "tensor_files") else None
        if files is not None and all(k in files for k in keys):
            return TensorFiles({k: str(files[k]) for k in keys})
        entry = self._puts.pop(id(state), None)
        if entry is None or entry[0] is not state:
            while len(self._puts) >= 3:  # the residual descent makes a new state per round: keep the latest few
                self._puts.pop(next(iter(self._puts)))
            entry = (state, {})
        self._puts[id(state)] = entry  # most recently used last
        refs = entry[1]
        if group.name not in refs:
            refs[group.name] = ray.put({k: state[k] for k in keys})
        return refs[group.name]

    def fit_many(self, pairs: list[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]], spec: ModelSpec,
                 symmetries: frozenset[str], *, device: torch.device | None = None, progress: bool = False,
                 names: list[str] | None = None) -> list[Fit]:
        """The per-layer :class:`Fit` of every ``(reference, model)`` pair, all groups of all pairs as concurrent
        tasks. ``seconds``: ``ffn`` = wall time until every FFN task returned, ``attention`` = the rest."""
        device_name = "cpu" if device is None else str(device)
        gpu = {"num_gpus": self.gpus_per_task} if device_name.startswith("cuda") else {}
        ffn_on, attention_on = "ffn" in symmetries, bool(symmetries & ATTENTION_CLASSES)
        start = time.perf_counter()
        ffn_jobs, attention_jobs = [], []
        for i, (reference, model) in enumerate(pairs):
            if ffn_on:
                ffn_jobs += [(i, g.name, self._ffn.options(**gpu).remote(self._source(reference, g), self._source(model, g), g, device_name))
                             for g in spec.ffn]
            if attention_on:
                attention_jobs += [(i, g.name, self._attention.options(**gpu).remote(self._source(reference, g), self._source(model, g), g,
                                                                                     frozenset(symmetries), device_name))
                                   for g in spec.attention]
        label = names[0] if names and len(names) == 1 else f"{len(pairs)} models"
        fits = [Fit(ModelTransform(), {}, {}) for _ in pairs]
        with tqdm(total=len(ffn_jobs) + len(attention_jobs), desc=f"aligning {label} on Ray", unit="group", disable=not progress,
                  leave=False) as bar:
            ffn_results = self._get([ref for *_, ref in ffn_jobs], bar)
            ffn_seconds = time.perf_counter() - start
            attention_results = self._get([ref for *_, ref in attention_jobs], bar)
        for (i, name, _), (perm, decrease) in zip(ffn_jobs, ffn_results):
            fits[i].transform.ffn[name] = perm
            fits[i].details[name] = ffn_details(perm, decrease)
        for (i, name, _), (x, details) in zip(attention_jobs, attention_results):
            fits[i].transform.heads[name] = x
            fits[i].details[name] = details
        for fit in fits:
            fit.seconds = {"ffn": ffn_seconds, "attention": time.perf_counter() - start - ffn_seconds}
        return fits

    def _get(self, refs: list, bar: tqdm) -> list:
        """Results in submission order; a task's SymmergeError (a NaN weight, say) is raised as itself."""
        pending, done = list(refs), {}
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for r in ready:
                    done[r] = ray.get(r)
                    bar.update(1)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, SymmergeError):
                raise SymmergeError(str(e.cause)) from None
            raise
        return [done[r] for r in refs]
