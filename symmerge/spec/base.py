"""What moves: a model's symmetry groups stated as data.

A spec lists, for every group, which tensors it touches, along which axis and in which block. Everything
downstream (group actions, solvers) sees only *canonical* tensors in PyTorch ``nn.Linear`` layout
(``W`` is out×in, ``y = x W^T + b``), so no solver ever names a layer. The translation between a checkpoint's
storage (GPT-2's ``Conv1D`` is stored in×out; its Q, K and V share one fused tensor) and that canonical view lives
in :class:`Slot` and :class:`StateView` alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field

import torch

from symmerge.errors import SymmergeError

TENSOR_GROUPS = ("embeddings", "attention", "ffn", "norms", "head", "other")
"""What :meth:`ModelSpec.tensor_groups` assigns each tensor to."""


@dataclass(frozen=True)
class Slot:
    """Where one canonical matrix (out×in) or vector lives inside a state dict.

    ``transposed``: the tensor is stored in×out (``transformers.pytorch_utils.Conv1D``).
    ``rows``: ``(start, stop)`` block of the canonical *out* axis, for fused projections such as GPT-2's ``c_attn``.
    ``period``: the out axis repeats in chunks of this many rows and ``rows`` is the block *within each chunk*;
    the canonical matrix is those blocks of every chunk, stacked in order. GPT-NeoX fuses Q|K|V per head
    (``query_key_value``: head ``h`` owns rows ``[h·3·d_h, (h+1)·3·d_h)``, Q then K then V): its Q is
    ``rows=(0, d_h), period=3·d_h``. 0: ``rows`` is one block of the whole axis.
    ``flatten``: view a >2-D tensor as a matrix, ``"trailing"`` → (shape[0], rest) (a conv weight: out channels
    first), ``"leading"`` → (rest, shape[-1]) (a CLS token or position table whose last axis is the hidden size).
    """

    key: str
    transposed: bool = False
    rows: tuple[int, int] | None = None
    flatten: str | None = None
    period: int = 0

    def select(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The canonical rows of ``t``, whose out axis is ``dim``: a view (a copy only for a ``period``, where the
        blocks are not one strided range)."""
        if self.rows is None:
            return t
        start, stop = self.rows
        if not self.period:
            return t.narrow(dim, start, stop - start)
        return self.chunks(t, dim).narrow(dim + 1, start, stop - start).flatten(dim, dim + 1)

    def chunks(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``t`` with its out axis ``dim`` split into (chunks, ``period``): a view, writable in place."""
        n = t.shape[dim]
        if n % self.period:
            raise SymmergeError(f"internal: {self.key} has {n} rows, not a multiple of its period {self.period}")
        return t.unflatten(dim, (n // self.period, self.period))


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
    ``num_heads``). ``rope``: rotary position embeddings, which restrict QK to a rotation and a scale per rotary
    plane, and any orthogonal map with one scale on the unrotated dimensions: ``rotary_dim`` is how many leading
    dimensions of each head are rotated (0: all of them; partial rotary, GPT-NeoX/StableLM/Phi/Phi-3/GPT-J), in HF's
    ``rotate_half`` planes ``(i, i + rotary_dim/2)``, or ``(2i, 2i + 1)`` with ``rope_interleaved``
    (``rotate_every_two``: GPT-J, Cohere). Missing biases are treated as zero. ``qk_fixed``: no QK rotation or rescaling is a
    symmetry (Qwen3 normalises every query and key head by RMSNorm with one gain shared by all heads, before RoPE:
    the gain does not commute with a rotation, and the norm's ε makes a rescaling inexact); VO transforms and head
    permutations still are. ``row_norms``: ``q_bias``/``k_bias`` name the gains of norms over the whole Q and K
    projections (OLMo-2; the projections have no bias), which follow head permutations; the norm sees every head,
    so a zero head (a narrower model embedded into a wider one) would change it.
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
    qk_fixed: bool = False
    row_norms: bool = False
    rotary_dim: int = 0
    rope_interleaved: bool = False

    @property
    def rotated_dims(self) -> int:
        """How many dimensions of each head RoPE rotates (``head_dim`` without RoPE or with full rotary)."""
        return self.rotary_dim or self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def slots(self) -> tuple[Slot, ...]:
        return tuple(s for s in (self.q, self.k, self.v, self.o, self.q_bias, self.k_bias, self.v_bias) if s)


@dataclass(frozen=True)
class Norm:
    """A normalisation layer and the linear layers that read its output (to fold its gain and bias into).

    The gain is ``offset + weight`` (Gemma's RMSNorm scales by ``1 + w``: ``offset`` 1), so the identity norm
    stores ``1 − offset``."""

    weight: Slot
    bias: Slot | None
    readers: tuple[Slot, ...]  # canonical out×d
    reader_biases: tuple[Slot | None, ...]  # one per reader (None: the reader has no bias)
    offset: float = 0.0


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
    no_residual: str = ""  # why the residual class is not offered although a head reads the stream ("" otherwise)
    qk_fixed_reason: str = ""  # why no QK map is a symmetry, where the attention groups are qk_fixed ("": per-head q/k norms)
    roles: tuple[tuple[str, str], ...] = ()  # (key, or module ending in ".") → tensor group, for tensors no group names
    blocks: tuple[str, ...] = ()  # each layer's module prefix, in order (``model.layers.3``): which layer a tensor is in
    pre_layers: tuple[str, ...] = ()  # norm modules (ending in ".") applied before the layers: BERT's embeddings.LayerNorm

    def layer_of(self, key: str) -> int | None:
        """The index of the layer (block) that holds tensor ``key``, or ``None`` for tensors outside the layers
        (embeddings, final norm, head)."""
        for i, block in enumerate(self.blocks):
            if key.startswith(block + "."):
                return i
        return None

    def in_layer(self, key: str, index: int) -> str:
        """``key`` (a tensor of some layer) renamed to the same tensor of layer ``index`` (a frankenmerge's renumbering)."""
        i = self.layer_of(key)
        if i is None:
            raise SymmergeError(f"{key} is not a tensor of a layer")
        block = self.blocks[i]
        return block[: len(block) - len(str(i))] + str(index) + key[len(block):]

    def is_embedding(self, key: str) -> bool:
        """Whether ``key`` comes before the layers — an input embedding, or the norm a post-LN model applies to it —
        rather than after them (final norm, head): mergekit's ``pre_weights``, which a frankenmerge takes from its
        first slice."""
        return self._role(key) == "embeddings" or any(key.startswith(module) for module in self.pre_layers)

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

    def tensor_groups(self, keys: Iterable[str]) -> dict[str, str]:
        """Each key → one of :data:`TENSOR_GROUPS`: the symmetry groups decide attention and FFN, the family's
        table names embeddings, norms and heads (``roles``); anything else is ``"other"``."""
        owner = {s.key: "attention" for g in self.attention for s in g.slots()}
        owner.update({s.key: "ffn" for g in self.ffn for s in g.slots()})
        return {k: owner.get(k) or self._role(k) for k in keys}

    def _role(self, key: str) -> str:
        """The first ``roles`` rule that matches ``key`` (a module pattern ends in ``.``), else ``"other"``."""
        return next((role for pattern, role in self.roles if key == pattern or pattern.endswith(".") and key.startswith(pattern)), "other")

    def describe(self) -> list[str]:
        """The lines ``symmerge inspect`` prints: sizes, then one line per symmetry class with its group."""
        kv, dh, layers = self.num_kv_heads or self.num_heads, self.head_dim, len(self.attention)
        grouped = kv != self.num_heads
        grouping = f" ({kv} key/value heads, groups of {self.num_heads // kv})" if grouped else ""
        rope = any(g.rope for g in self.attention)
        qk_fixed = any(g.qk_fixed for g in self.attention)
        rotated = max((g.rotated_dims for g in self.attention if g.rope), default=dh)
        layout = ", interleaved" if any(g.rope_interleaved for g in self.attention) else ""
        qk_group = (f"SO(2)^{rotated // 2} (RoPE planes{layout})" + (f" x O({dh - rotated}) (unrotated dims)" if rotated < dh else "")
                    if rope else f"O({dh})")
        lines = [
            f"  {self.num_layers} layers, hidden size {self.hidden_size}, {self.num_heads} heads of dim {dh}{grouping}, FFN width {self.ffn_width}",
            "symmetry groups:",
            f"  ffn       FFN neuron permutation       {len(self.ffn)} groups, S_{self.ffn_width} each",
            (f"  qk        not transformed here         {self.qk_fixed_reason}" if self.qk_fixed_reason
             else "  qk        not a symmetry here          per-head q/k norms: a QK rotation or rescaling changes the outputs") if qk_fixed
            else f"  qk        per-KV-head QK rotation      {layers} layers x {kv} heads, {qk_group} each",
            f"  vo        per-KV-head VO rotation      {layers} layers x {kv} heads, O({dh}) each",
            f"  scale     QK and VO rescaling          {layers} layers x {kv} heads"
            + (" (VO only)" if qk_fixed else ", one per RoPE plane for QK" + (" and one for its unrotated dims" if rotated < dh else "")
               if rope else ""),
            f"  heads     head permutation             {layers} groups, S_{kv}"
            + (f" x (S_{self.num_heads // kv})^{kv} within groups" if grouped else " each"),
        ]
        return lines + [self._describe_residual()]

    def _describe_residual(self) -> str:
        """The residual line: its group and how many norms are folded first, or why it is not offered."""
        if self.residual is None:
            why = self.no_residual or "needs a head reading the stream; a bare model's output is the stream itself"
            return f"  residual  not available for this model ({why})"
        d = self.hidden_size
        kind = {"orthogonal": f"O({d})", "centered": f"O({d}) fixing the all-ones direction",
                "permutation": f"S_{d} (post-LN or sandwich norms: permutations only)"}[self.residual.kind]
        folded = f", after folding {len(self.residual.norms)} norms" if self.residual.norms else ""
        return f"  residual  residual-stream map          1 group, {kind}{folded}"


class _Overlay(MutableMapping[str, torch.Tensor]):
    """Writes kept here, reads falling through to ``source`` (never mutated): a view of a memory-mapped or lazily
    transformed state that reads only the tensors asked for."""

    def __init__(self, source: Mapping[str, torch.Tensor]):
        self.source, self.written = source, {}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.written[key] if key in self.written else self.source[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.written[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("StateView overlays do not delete keys")

    def __contains__(self, key: object) -> bool:
        return key in self.written or key in self.source

    def __iter__(self):
        yield from self.source
        yield from (k for k in self.written if k not in self.source)

    def __len__(self) -> int:
        return len(self.source) + sum(k not in self.source for k in self.written)


class StateView:
    """Copy-on-write access to canonical blocks of a state dict.

    ``get`` returns a float tensor in canonical layout (a fresh tensor, safe to modify); ``set`` writes one back,
    cloning the stored tensor on first write so the source dict is never mutated. Math runs in float32 (float64
    stays float64); values are cast back to the stored dtype on write.
    """

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.source = state
        # a plain dict is copied (shallow); any other mapping (memory-mapped, lazily transformed) is overlaid, so
        # reading a few tensors never reads the others
        self.state: MutableMapping[str, torch.Tensor] = dict(state) if isinstance(state, dict) else _Overlay(state)
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
        return slot.select(t)

    def peek(self, slot: Slot) -> torch.Tensor:
        """The canonical block as stored (its dtype; a view where the layout allows, never a copy made for the
        caller): for reading only, by code that converts what it reads piece by piece."""
        return self._canonical(self.stored(slot.key), slot)

    def get(self, slot: Slot) -> torch.Tensor:
        t = self.peek(slot)
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        return t.to(dtype=dtype, copy=True)

    def reallocate(self, values: Iterable[tuple[Slot, torch.Tensor]]) -> None:
        """Replace every tensor the slots name by zeros shaped to hold ``values`` (canonical blocks), then ``set``
        can write them: a narrow model's tensors grow to a wider model's shape (docs/DESIGN.md §1, widths). A fused
        tensor's canonical rows end where its last block ends. Storage dtype and layout (``transposed``) are kept."""
        shapes: dict[str, list[int]] = {}
        layout: dict[str, Slot] = {}
        for slot, value in values:
            if slot.flatten is not None:
                raise SymmergeError(f"internal: cannot resize the flattened tensor {slot.key}")
            rows = value.shape[0] if slot.rows is None else slot.rows[1]
            if slot.period:  # as many chunks as the value has blocks
                rows = value.shape[0] // (slot.rows[1] - slot.rows[0]) * slot.period
            shape = shapes.setdefault(slot.key, [0, *value.shape[1:]])
            shape[0] = max(shape[0], rows)
            layout[slot.key] = slot
        for key, shape in shapes.items():
            stored = shape[::-1] if layout[key].transposed else shape
            self.state[key] = self.stored(key).new_zeros(stored)
            self._owned.add(key)

    def set(self, slot: Slot, value: torch.Tensor) -> None:
        if slot.key not in self._owned:
            self.state[slot.key] = self.stored(slot.key).clone()
            self._owned.add(slot.key)
        if slot.period:  # the blocks are not one strided view: write them through the (chunks, period) view
            whole = self._canonical(self.state[slot.key], dataclasses.replace(slot, rows=None, period=0))
            start, stop = slot.rows
            t = slot.chunks(whole)[:, start:stop]
            if t.flatten(0, 1).shape != value.shape:
                raise SymmergeError(f"internal: writing shape {tuple(value.shape)} into {slot} of shape {tuple(t.flatten(0, 1).shape)}")
            t.copy_(value.reshape(t.shape).to(t.dtype))
            return
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
