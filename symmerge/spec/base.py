"""What moves: a model's symmetry groups stated as data.

A spec lists, for every group, which tensors it touches, along which axis and in which block. Everything
downstream (group actions, solvers) sees only *canonical* tensors in PyTorch ``nn.Linear`` layout
(``W`` is out×in, ``y = x W^T + b``), so no solver ever names a layer. The translation between a checkpoint's
storage (GPT-2's ``Conv1D`` is stored in×out; its Q, K and V share one fused tensor) and that canonical view lives
in :class:`Slot` and :class:`StateView` alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field

import torch

from symmerge.errors import SymmergeError


@dataclass(frozen=True)
class Slot:
    """Where one canonical matrix (out×in) or vector lives inside a state dict.

    ``transposed``: the tensor is stored in×out (``transformers.pytorch_utils.Conv1D``).
    ``rows``: ``(start, stop)`` block of the canonical *out* axis, for fused projections such as GPT-2's ``c_attn``.
    ``flatten``: view a >2-D tensor as a matrix, ``"trailing"`` → (shape[0], rest) (a conv weight: out channels
    first), ``"leading"`` → (rest, shape[-1]) (a CLS token or position table whose last axis is the hidden size).
    """

    key: str
    transposed: bool = False
    rows: tuple[int, int] | None = None
    flatten: str | None = None


@dataclass(frozen=True)
class FFNGroup:
    """One FFN's neuron permutation ``P`` (docs/DESIGN.md §1): rows of every input weight and bias, columns of every
    output weight. Gated MLPs list gate and up projections both in ``inputs`` so they move together."""

    name: str
    width: int
    inputs: tuple[Slot, ...]
    input_biases: tuple[Slot, ...]
    outputs: tuple[Slot, ...]

    def slots(self) -> tuple[Slot, ...]:
        return self.inputs + self.input_biases + self.outputs


@dataclass(frozen=True)
class AttentionGroup:
    """One attention layer's per-head groups: QK and VO rotations, QK and VO rescaling, head permutation.

    Head ``h`` owns rows ``[h·d_h, (h+1)·d_h)`` of Q (and its bias) and the same columns of O; KV head ``g`` owns
    rows ``[g·d_h, (g+1)·d_h)`` of K and V. ``num_kv_heads`` < ``num_heads`` is GQA/MQA (0: same as
    ``num_heads``). ``rope``: rotary position embeddings in HF's ``rotate_half`` layout, which restricts QK to
    per-plane rotations. Missing biases are treated as zero.
    """

    name: str
    num_heads: int
    head_dim: int
    q: Slot
    k: Slot
    v: Slot
    o: Slot
    q_bias: Slot | None = None
    k_bias: Slot | None = None
    v_bias: Slot | None = None
    num_kv_heads: int = 0
    rope: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def slots(self) -> tuple[Slot, ...]:
        return tuple(s for s in (self.q, self.k, self.v, self.o, self.q_bias, self.k_bias, self.v_bias) if s)


@dataclass(frozen=True)
class Norm:
    """A normalisation layer and the linear layers that read its output (to fold its gain and bias into)."""

    weight: Slot
    bias: Slot | None
    readers: tuple[Slot, ...]  # canonical out×d
    reader_biases: tuple[Slot | None, ...]  # one per reader (None: the reader has no bias)


@dataclass(frozen=True)
class ResidualGroup:
    """The residual stream's basis (width d), shared by every layer (docs/DESIGN.md §1).

    ``kind``: ``"orthogonal"`` (RMSNorm models, after folding the norm gains into the readers), ``"centered"``
    (pre-LN LayerNorm models after folding: orthogonal maps that fix the all-ones direction), ``"permutation"``.
    The action of ``Q`` (d×d): ``embeddings`` (stream on the last axis) ``E → E Q``; ``readers`` ``W → W Q``;
    ``writers`` ``W → Q^T W``; ``vectors`` (writer biases, norm biases) ``b → b Q``.
    ``tied``: (head key, embedding key) when the config ties them: folding the final norm into the head unties them.
    """

    kind: str
    width: int
    embeddings: tuple[Slot, ...]
    readers: tuple[Slot, ...]
    writers: tuple[Slot, ...]
    vectors: tuple[Slot, ...]
    norms: tuple[Norm, ...]
    tied: tuple[str, str] | None = None

    def keys(self) -> set[str]:
        slots = (*self.embeddings, *self.readers, *self.writers, *self.vectors)
        norm_slots = [x for n in self.norms for x in (n.weight, n.bias, *n.reader_biases) if x]
        return {s.key for s in (*slots, *norm_slots)}


@dataclass(frozen=True)
class ModelSpec:
    """The symmetry structure of one architecture instance (a family plus the sizes read from its config)."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    ffn_width: int
    ffn: tuple[FFNGroup, ...] = field(default=())
    attention: tuple[AttentionGroup, ...] = field(default=())
    num_kv_heads: int = 0
    residual: ResidualGroup | None = None

    def shape(self) -> dict[str, object]:
        """The values two models must share to be aligned, in the order they are checked."""
        return {
            "family": self.family,
            "layers": self.num_layers,
            "hidden size": self.hidden_size,
            "attention heads": self.num_heads,
            "key/value heads": self.num_kv_heads or self.num_heads,
            "head dim": self.head_dim,
            "FFN width": self.ffn_width,
        }

    def groups(self) -> tuple[FFNGroup | AttentionGroup, ...]:
        return (*self.ffn, *self.attention)

    def touched_keys(self) -> set[str]:
        return {s.key for g in self.groups() for s in g.slots()}


class StateView:
    """Copy-on-write access to canonical blocks of a state dict.

    ``get`` returns a float tensor in canonical layout (a fresh tensor, safe to modify); ``set`` writes one back,
    cloning the stored tensor on first write so the source dict is never mutated. Math runs in float32 (float64
    stays float64); values are cast back to the stored dtype on write.
    """

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.source = state
        self.state: MutableMapping[str, torch.Tensor] = dict(state)
        self._owned: set[str] = set()

    def stored(self, key: str) -> torch.Tensor:
        try:
            return self.state[key]
        except KeyError:
            raise SymmergeError(f"tensor {key!r} is missing from the checkpoint") from None

    @staticmethod
    def _canonical(t: torch.Tensor, slot: Slot) -> torch.Tensor:
        if slot.flatten == "trailing":
            t = t.reshape(t.shape[0], -1)
        elif slot.flatten == "leading":
            t = t.reshape(-1, t.shape[-1])
        t = t.T if slot.transposed else t
        if slot.rows is not None:
            t = t[slot.rows[0] : slot.rows[1]]
        return t

    def get(self, slot: Slot) -> torch.Tensor:
        t = self._canonical(self.stored(slot.key), slot)
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        return t.to(dtype=dtype, copy=True)

    def set(self, slot: Slot, value: torch.Tensor) -> None:
        if slot.key not in self._owned:
            self.state[slot.key] = self.stored(slot.key).clone()
            self._owned.add(slot.key)
        t = self._canonical(self.state[slot.key], slot)
        if t.shape != value.shape:
            raise SymmergeError(f"internal: writing shape {tuple(value.shape)} into {slot} of shape {tuple(t.shape)}")
        t.copy_(value.to(t.dtype))


def find_prefix(keys: Iterable[str], suffix: str) -> str | None:
    """The unique prefix ``p`` such that ``p + suffix`` is a key (``""``, ``"bert."``, ``"roberta."``...)."""
    prefixes = {k[: -len(suffix)] for k in keys if k.endswith(suffix) and (k == suffix or k[-len(suffix) - 1] == ".")}
    if len(prefixes) > 1:
        raise SymmergeError(f"the checkpoint holds several models ({sorted(prefixes)} all have {suffix!r})")
    return prefixes.pop() if prefixes else None
