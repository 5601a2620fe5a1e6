"""A recipe's references — a model folder, a Hugging Face repo id, ``MODEL+ADAPTER`` for a LoRA — resolved to
folders and opened as checkpoints (headers only); a checkpoint's identity is its folder and adapter, so the same
model named twice is opened once, and listed twice among one slice's inputs is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from symmerge.errors import SymmergeError, cut
from symmerge.io import Checkpoint, open_checkpoint
from symmerge.io.hub import REPO_ID, hub_snapshot, open_lora, split_reference


def _exists(p: Path, what: str, given: str) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte...
        reason = getattr(e, "strerror", None) or str(e)
        raise SymmergeError(f"{what}: {cut(given)} is not a usable path ({reason})") from None


def resolve_path(path: str, root: Path | None, what: str) -> Path:
    """A local folder (as given, or relative to the recipe's folder) or a Hugging Face repo id's snapshot."""
    try:
        p = Path(path).expanduser()
    except RuntimeError as e:  # ~user that does not exist
        raise SymmergeError(f"{what}: {cut(path)}: {e}") from None
    if _exists(p, what, path) or p.is_absolute() or root is None and not REPO_ID.fullmatch(path):
        return p
    if root is not None:
        candidate = root / p
        if _exists(candidate, what, path):
            return candidate
    snapshot = hub_snapshot(path, what)
    if snapshot is not None:
        return snapshot
    if root is None:
        return p
    raise SymmergeError(f"{what}: {cut(path)} does not exist (looked in the current directory and in {root})")


def shown_path(path: Path) -> Path:
    """How a model is named in tables and the card: a Hugging Face cache snapshot
    (``…/models--org--name/snapshots/<commit>``) by its repo's name, not by the commit hash; other paths as they are."""
    p = Path(path)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return Path(p.parent.parent.name.split("--")[-1])
    return p


def open_reference(ref: str, root: Path | None, what: str, allow_pickle: bool) -> Checkpoint:
    """Open a model reference: a folder or repo id, optionally ``+ADAPTER`` (a LoRA folder or repo id)."""
    model, lora = split_reference(ref)
    ckpt = open_checkpoint(resolve_path(model, root, what), allow_pickle)
    if lora is not None:
        ckpt.lora = open_lora(resolve_path(lora, root, f"{what} (LoRA adapter)"), what)
        ckpt.lora.check(ckpt.shapes(), what)  # every adapter tensor lands on a model tensor of its shape, or a one-line refusal
    ckpt.reference = ref
    return ckpt


def refuse_repeated_models(identities: list[tuple[Path, Path | None]], where: str, name: Callable[[int], str] | None = None) -> None:
    """Refuse a model listed twice among one slice's sources (or one ``models:`` list), as mergekit 0.1.5 does
    (``Duplicate merge inputs``, checked before it merges anything): it keys a tensor's inputs by model, so a repeat has
    no meaning there, and here it counted twice in ``models:`` but once in ``slices:``. The same folder with a
    different LoRA adapter is another model. ``name(i)``: how the error names the i-th (default ``{where}.{i}``)."""
    name = name or (lambda i: f"{where}.{i}")
    for j, identity in enumerate(identities):
        if identity in identities[:j]:
            i = identities.index(identity)
            raise SymmergeError(f"{name(i)} and {name(j)} are both {absolute_reference(identity)}: a tensor takes one input per "
                                "model (mergekit 0.1.5 refuses this too); list it once, with a larger weight for a larger share")


def absolute_reference(identity: tuple[Path, Path | None]) -> str:
    """A checkpoint's reference as the recipe as run (merge.yaml) records it: its absolute folder, ``+ADAPTER``."""
    return str(identity[0]) + (f"+{identity[1]}" if identity[1] is not None else "")


def index_in(models: list[Checkpoint], ckpt: Checkpoint) -> int:
    """``ckpt``'s index among ``models`` (the same folder and adapter counts once), appended when new."""
    known = next((i for i, c in enumerate(models) if c.identity == ckpt.identity), None)
    if known is None:
        models.append(ckpt)
        known = len(models) - 1
    return known
