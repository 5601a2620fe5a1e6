"""Top-k magnitude thresholds and the chunked TIES kernel (trim, elect, disjoint merge) that the
task-arithmetic methods share."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from symmerge.errors import SymmergeError
from symmerge.merge.methods.common import _broadcast

Tensor = torch.Tensor


#: Tensors up to this many entries get their threshold straight from ``torch.kthvalue`` (which copies the input
#: and an int64 index array); larger ones use the exact bracketing selection in :func:`magnitude_threshold`.
EXACT_DIRECT_MAX = 1 << 22
_BRACKET_SAMPLE = 1 << 18


def keep_count(density: float, n: int) -> int:
    """How many of ``n`` entries a top-``density`` trim keeps: ``⌊density · n⌋``, in ``[1, n]`` (mergekit's count)."""
    return min(n, max(1, int(density * n)))


def magnitude_threshold(magnitudes: Tensor, density: float, *, sample_size: int | None = None, generator: torch.Generator | None = None) -> float:
    """The ``k``-th largest entry of ``magnitudes`` (any shape, entries ``>= 0``), ``k = keep_count(density, n)``.

    Keeping the entries ``>= threshold`` keeps the top-``density`` fraction by magnitude (a few more when several
    entries tie with the threshold). ``density = 1`` returns 0 (keep everything).

    Exact by default: ``torch.kthvalue`` for tensors up to :data:`EXACT_DIRECT_MAX` entries; above, a random
    sample brackets the ``k``-th largest value in ``[lo, hi]`` and only the entries inside the bracket are gathered
    and selected from — exact (checked by counting, with a full ``kthvalue`` fallback if the bracket misses),
    using bool masks instead of ``kthvalue``'s 12 bytes per entry. ``sample_size=m`` instead returns the sampled
    quantile of ``m`` entries drawn with replacement (approximate, for huge tensors when speed matters more).
    """
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise SymmergeError("cannot compute a magnitude threshold of an empty tensor")
    k = keep_count(density, n)
    if k >= n:
        return 0.0
    if sample_size is not None and sample_size > 0 and n > sample_size:
        idx = torch.randint(n, (sample_size,), generator=generator, device=flat.device)
        sample = flat[idx].float()
        return float(torch.kthvalue(sample, min(sample_size, max(1, round((1 - k / n) * sample_size)))).values)
    return kth_largest(flat, k)


def kth_largest(values: Tensor, k: int) -> float:
    """The ``k``-th largest entry of ``values`` (any shape, ``1 <= k <= n``), exactly: ``torch.kthvalue`` up to
    :data:`EXACT_DIRECT_MAX` entries, above it the bracketing selection described in :func:`magnitude_threshold`."""
    flat = values.reshape(-1)
    n = flat.numel()
    if n <= EXACT_DIRECT_MAX:
        return float(torch.kthvalue(flat, n - k + 1).values)
    # Exact selection by bracketing: rank n−k+1 from the bottom sits near the (1 − k/n) sample quantile; a margin
    # of 6 binomial standard deviations makes a miss (handled below, exactly) vanishingly rare.
    g = torch.Generator(device=flat.device).manual_seed(0x5EED)
    s = _BRACKET_SAMPLE
    sample = flat[torch.randint(n, (s,), generator=g, device=flat.device)]
    p = 1 - k / n
    margin = 6 * math.sqrt(p * (1 - p) / s) + 2 / s
    lo = torch.kthvalue(sample, min(s, max(1, math.floor((p - margin) * s)))).values
    hi = torch.kthvalue(sample, min(s, max(1, math.ceil((p + margin) * s)))).values
    above = int((flat > hi).sum())
    candidates = flat[(flat >= lo) & (flat <= hi)]
    r = k - above  # the wanted value is the r-th largest candidate, if the bracket holds it
    if 1 <= r <= candidates.numel():
        return float(torch.kthvalue(candidates, candidates.numel() - r + 1).values)
    return float(torch.kthvalue(flat, n - k + 1).values)


def global_magnitude_thresholds(
    task_vectors: Iterable[Sequence[Tensor]] | Mapping[str, Sequence[Tensor]],
    density: float | Sequence[float],
    *,
    sample_rate: float | None = None,
    seed: int = 0,
) -> list[float]:
    """Whole-model TIES trimming (Yadav et al. 2023, "Trim" step): one magnitude threshold per model, over all tensors.

    ``task_vectors`` yields, for each tensor of the model, the per-model task vectors ``[τ_1, ..., τ_M]``
    (``τ_i = θ_i − base``, one shape per tensor) — an iterable (consumed once, so a generator that loads tensors
    lazily works) or a mapping name → list. Returns ``[t_1, ..., t_M]``: ``t_i`` is the ``k``-th largest
    ``|τ_i|`` over the whole model, ``k = keep_count(density_i, Σ numel)`` (``density``: one value, or one per
    model). Pass it as ``ties(..., thresholds=...)``
    for every tensor: the kept fraction then varies between tensors, ``density`` overall per model, as in the
    paper (per-tensor trimming, the default of :func:`ties`, keeps ``density`` of every tensor instead).

    Exact by default, which holds ``|τ_i|`` of the whole model in float32 (4 bytes per parameter per model, twice
    that for one model at a time while its pieces are concatenated).
    ``sample_rate=r`` keeps a uniform sample of about ``r`` of each tensor's entries instead (drawn with
    replacement, seeded by ``seed``) and returns the sample's quantile: ~``4 r`` bytes per parameter per model,
    one pass, approximate (for a 7B model, ``r = 1e-3`` gives 7M samples per model).
    """
    items = task_vectors.values() if isinstance(task_vectors, Mapping) else task_vectors
    pools: list[list[Tensor]] | None = None
    total = 0
    g: torch.Generator | None = None
    for taus in items:
        if pools is None:
            pools = [[] for _ in taus]
        if len(taus) != len(pools):
            raise SymmergeError(f"global_magnitude_thresholds: got {len(taus)} task vectors for a tensor, {len(pools)} before")
        n = taus[0].numel()
        total += n
        for i, tau in enumerate(taus):
            flat = tau.reshape(-1)
            if sample_rate is not None:
                if g is None:
                    g = torch.Generator(device=flat.device).manual_seed(seed)
                m = min(n, max(1, math.ceil(sample_rate * n)))
                flat = flat[torch.randint(n, (m,), generator=g, device=flat.device)]
            pools[i].append(flat.to(torch.float32).abs())
    if pools is None or total == 0:
        raise SymmergeError("global_magnitude_thresholds: no task vectors given")
    densities = _broadcast("global_magnitude_thresholds", "density", density, len(pools))
    out = []
    for chunks, d in zip(pools, densities):
        magnitudes = torch.cat(chunks)
        chunks.clear()
        out.append(magnitude_threshold(magnitudes, d))
    return out


def _trim_(tau: Tensor, threshold: float) -> Tensor:
    """Zero, in place, the entries of ``tau`` with ``|τ| < threshold`` (bool temporaries only)."""
    if threshold > 0:
        tau.masked_fill_(torch.logical_and(tau < threshold, tau > -threshold), 0)
    return tau


def _trim_to_count_(tau: Tensor, threshold: float, k: int) -> Tensor:
    """Keep exactly the top ``k`` magnitudes of ``tau`` (in place): everything above ``threshold`` (the ``k``-th
    largest magnitude) and, of the entries equal to it, the first ones in memory order. bf16 task vectors tie at
    the threshold often; keeping every tied entry would keep far more than ``density`` (mergekit, like this,
    keeps exactly ``k``)."""
    _trim_(tau, threshold)
    if threshold > 0:
        flat = tau.view(-1)
        surplus = int(torch.count_nonzero(flat)) - k
        if surplus > 0:
            tied = (flat.abs() == threshold).nonzero().squeeze(1)
            flat[tied[len(tied) - surplus:]] = 0
    return tau


def _disjoint_merge(task_vector: Callable[[int], Tensor], n_models: int, weights: list[float], like: Tensor, dtype: torch.dtype,
                    normalize: bool = True) -> Tensor:
    """TIES "elect" and "disjoint merge" over task vectors produced on demand by ``task_vector(i)``.

    ``γ = sign(Σ_i w_i τ̂_i)`` per entry (mass-based election); ``a_i = [τ̂_i ≠ 0, sign τ̂_i = γ]``;
    ``τ_m = Σ_i w_i a_i τ̂_i / Σ_i w_i a_i`` (``normalize``) or ``Σ_i w_i a_i τ̂_i`` (not); 0 where no model agrees
    (all τ̂_i zero, or ``Σ_i w_i τ̂_i = 0`` exactly: a tie elects no sign). Two passes recompute the task vectors
    instead of stacking M of them: peak memory is four float buffers plus bool masks, whatever M.
    """
    sign = torch.zeros(like.shape, dtype=dtype, device=like.device)
    for i in range(n_models):
        sign.add_(task_vector(i), alpha=weights[i])
    sign.sign_()
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign) if normalize else None
    for i in range(n_models):
        tau = task_vector(i).mul_(sign).clamp_min_(0)  # |τ̂_i| where it agrees with γ, else 0
        if den is not None:
            den.add_(tau > 0, alpha=weights[i])
        num.add_(tau.mul_(sign), alpha=weights[i])
        del tau
    return num if den is None else num.div_(den.masked_fill_(den == 0, 1))


#: TIES works on chunks of this many entries: the trim thresholds come from counts (or histograms) of the task
#: vectors accumulated chunk by chunk, and trim, sign election and disjoint mean run chunk by chunk, so the scratch
#: memory is a few chunk-sized float32 buffers per model whatever the tensor's size. 2^18 entries (1 MiB a float32
#: buffer, ~8 MiB in use for two models) stay in cache where 2^20 did not: the kernel ran ~1.5x faster on the
#: 168M-parameter benchmark. Every operation is elementwise (torch's vector and scalar paths round alike, add with
#: alpha included: both fused multiply-adds), so the chunk size changes no result.
TIES_CHUNK = 1 << 18
_RADIX_HI, _RADIX_LO = 1 << 15, 1 << 16


def _rank_bin(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin of ``hist`` that holds the ``k``-th largest entry (``k >= 1``), and how many entries lie above it."""
    above = hist.flip(0).cumsum(0).flip(0) - hist
    b = int(torch.nonzero((above < k) & (above + hist >= k))[0])
    return b, int(above[b])


class _TiesScratch:
    """Chunk-sized buffers: the base and one task vector per model in float32, int32 bit patterns, a bool mask."""

    def __init__(self, n_models: int, size: int):
        f32, i32 = torch.float32, torch.int32
        self.base = torch.empty(size, dtype=f32)
        self.taus = [torch.empty(size, dtype=f32) for _ in range(n_models)]
        self.bits = torch.empty(size, dtype=i32)
        self.key = torch.empty(size, dtype=i32)
        self.num = torch.empty(size, dtype=f32)
        self.den = torch.empty(size, dtype=f32)
        self.mask = torch.empty(size, dtype=torch.bool)

    def task_vector(self, i: int, theta: Tensor, base: Tensor, s: int, e: int, base_ready: bool = False) -> Tensor:
        """``θ[s:e] − base[s:e]`` in float32, in model ``i``'s buffer (only same-dtype in-place ops: fast on CPU)."""
        if not base_ready:
            self.base[: e - s].copy_(base[s:e])
        return self.taus[i][: e - s].copy_(theta[s:e]).sub_(self.base[: e - s])

    def abs_bits(self, tau: Tensor) -> Tensor:
        """``|τ|`` as int32 bit patterns, which order like the magnitudes (finite floats, sign bit cleared)."""
        return torch.bitwise_and(tau.view(torch.int32), 0x7FFFFFFF, out=self.bits[: tau.numel()])


#: The trim plan's bracket: this many entries of ``|τ|``, drawn with a fixed seed, bracket the ``k``-th largest.
TIES_SAMPLE = 1 << 14


def _sampled_bracket(theta: Tensor, base: Tensor, k: int) -> tuple[float, float]:
    """``lo <= hi`` that hold the ``k``-th largest ``|τ|``, ``τ = θ − base`` (flat), with near certainty: the
    sample quantiles at rank ``n − k + 1`` ± 6 binomial standard deviations of :data:`TIES_SAMPLE` entries drawn
    with a fixed seed (the caller checks by counting and falls back to an exact selection on a miss).

    The sample is stratified — one entry drawn from each of ``s`` equal runs of ``⌊n/s⌋`` entries — so its indices
    come in memory order without a sort (which cost as much as the rest of the bracket), and its quantiles vary
    no more than those of independent draws: the binomial margin stays conservative."""
    n = theta.numel()
    s = min(TIES_SAMPLE, max(n, 1024))  # a small tensor: about as many draws as entries
    g = torch.Generator(device=theta.device).manual_seed(0x5EED)
    stride = n // s
    if stride >= 1:
        idx = torch.randint(stride, (s,), generator=g, device=theta.device)
        idx.add_(torch.arange(0, s * stride, stride, device=theta.device))
    else:  # fewer than 1024 entries: independent draws (with replacement), sorted into memory order
        idx = torch.randint(n, (s,), generator=g, device=theta.device).sort().values
    sample = (theta[idx].float() - base[idx].float()).abs_()  # the same float32 arithmetic as the full pass
    p = 1 - k / n
    margin = 6 * math.sqrt(p * (1 - p) / s) + 2 / s
    lo = torch.kthvalue(sample, min(s, max(1, math.floor((p - margin) * s)))).values
    hi = torch.kthvalue(sample, min(s, max(1, math.ceil((p + margin) * s)))).values
    return float(lo), float(hi)


def _below(t: float) -> float:
    """The largest float32 below ``t`` (toward 0): ``|x| > _below(t)`` ⟺ ``|x| >= t`` for float32 ``x``, ``t > 0``."""
    return float(torch.nextafter(torch.tensor(t, dtype=torch.float32), torch.tensor(0.0, dtype=torch.float32)))


def _count_above(magnitudes: Tensor, t: float, scratch: Tensor) -> int:
    """``#{j : m_j > t}`` for float32 ``magnitudes >= 0`` (at most 2^24 of them, ``t >= 0``), as
    ``Σ sign(hardshrink(m, t))``: hardshrink zeroes ``m <= t``, sign maps the rest to 1, and a float32 sum of at
    most 2^24 ones is exact. Float ops only, in ``scratch`` (same size): on CPU a comparison into a bool mask and
    its ``count_nonzero`` cost about twice as much."""
    return int(torch.hardshrink(magnitudes, t, out=scratch).sign_().sum())


def _trim_plan(theta: Tensor, base: Tensor, k: int, scratch: _TiesScratch, i: int) -> tuple[float, int]:
    """``(t, p)``: keeping ``|τ| >= t`` in ``τ[:p]`` and ``|τ| > t`` in ``τ[p:]`` keeps exactly the ``k`` largest
    ``|τ|``, ``τ = θ − base`` (flat), entries tied with ``t`` the first ones in memory order; ``t = 0``: keep all.

    One pass over the chunks: a sampled bracket ``[lo, hi]`` (:func:`_sampled_bracket`) holds the ``k``-th largest
    ``|τ|``; the pass counts the entries above ``hi`` and gathers those inside the bracket (only counts them when
    ``lo = hi``: bf16 task vectors take few distinct values, and the threshold is often one of them, tied with a
    sixth of the entries), and the threshold is selected among them. Exact: when the counts show that the bracket
    missed, :func:`_radix_trim_plan` selects from the whole tensor. Same result as :func:`magnitude_threshold` +
    :func:`_trim_to_count_`.
    """
    n = theta.numel()
    if k >= n:
        return 0.0, n
    lo, hi = _sampled_bracket(theta, base, k)
    below_hi = _below(hi)
    bounds = [(s, min(s + TIES_CHUNK, n)) for s in range(0, n, TIES_CHUNK)]
    above, inside = 0, []  # entries > hi; per chunk, those in [lo, hi] (their count when lo = hi)
    for s, e in bounds:
        mag = torch.abs(scratch.task_vector(i, theta, base, s, e), out=scratch.num[: e - s])
        n_above = _count_above(mag, hi, scratch.den[: e - s])
        above += n_above
        if lo == hi:  # |τ| >= hi ⟺ |τ| > below(hi); every entry when hi = 0
            inside.append((e - s if hi == 0 else _count_above(mag, below_hi, scratch.den[: e - s])) - n_above)
        else:
            mask = scratch.mask[: e - s]
            inside.append(mag[torch.ge(mag, lo, out=mask).logical_and_(mag <= hi)])
    r = k - above  # the k-th largest is the r-th largest inside the bracket, if it is there
    if lo == hi:
        if not 1 <= r <= sum(inside):
            return _radix_trim_plan(theta, base, k, scratch, i)
        t, tied_per_chunk = hi, torch.tensor(inside)
    else:
        values = torch.cat(inside)
        if not 1 <= r <= values.numel():
            return _radix_trim_plan(theta, base, k, scratch, i)
        t = float(torch.kthvalue(values, values.numel() - r + 1).values)
        r -= int((values > t).count_nonzero())  # how many entries equal to t are kept (>= 1)
        tied_per_chunk = torch.tensor([int((v == t).count_nonzero()) for v in inside])
    return _tie_cut(theta, base, t, r, tied_per_chunk, bounds, scratch, i)


_TIE_PIECE = 1 << 14


def _tie_cut(theta: Tensor, base: Tensor, t: float, r: int, tied_per_chunk: Tensor, bounds: list[tuple[int, int]],
             scratch: _TiesScratch, i: int) -> tuple[float, int]:
    """The plan that keeps the first ``r`` entries with ``|τ| = t`` (memory order), from their count per chunk: the
    position after the ``r``-th one (found in the one chunk that holds it), or ``n`` when all are kept."""
    n = theta.numel()
    if t == 0:  # the k-th largest magnitude is 0: nothing to trim
        return 0.0, n
    tied = tied_per_chunk.cumsum(0)
    if r >= int(tied[-1]):
        return t, n
    if r == 0:
        return t, 0
    j = int(torch.searchsorted(tied, r))  # the first chunk whose running count reaches r
    before = int(tied[j - 1]) if j > 0 else 0
    s, e = bounds[j]
    bits = scratch.abs_bits(scratch.task_vector(i, theta, base, s, e))
    v = int(torch.tensor(t, dtype=torch.float32).view(torch.int32))
    tied_here = torch.eq(bits, v, out=scratch.mask[: e - s])
    # the r-th tied entry: count per piece of _TIE_PIECE entries, then list the tied entries of one piece only
    m = (e - s) // _TIE_PIECE * _TIE_PIECE
    counts = torch.cat([tied_here[:m].view(-1, _TIE_PIECE).sum(1), tied_here[m:].sum().reshape(1)]).cumsum(0)
    q = int(torch.searchsorted(counts, r - before))
    start = q * _TIE_PIECE
    prior = before + (int(counts[q - 1]) if q > 0 else 0)
    idx = tied_here[start : start + _TIE_PIECE].nonzero().squeeze(1)
    return t, s + start + int(idx[r - prior - 1]) + 1


def _radix_trim_plan(theta: Tensor, base: Tensor, k: int, scratch: _TiesScratch, i: int) -> tuple[float, int]:
    """:func:`_trim_plan` by exact radix selection on the float bits (non-negative finite float32 values order like
    their int32 bit patterns), in two histogram passes — the 15 high bits, then the 16 low bits within the bin
    that holds the ``k``-th largest — with no sort, no ``kthvalue`` copy and no int64 index array. Slower than the
    bracket (``bincount`` costs ~20 elementwise operations): the fallback when the bracket misses."""
    n = theta.numel()
    if k >= n:
        return 0.0, n
    bounds = [(s, min(s + TIES_CHUNK, n)) for s in range(0, n, TIES_CHUNK)]
    hist = torch.zeros(_RADIX_HI, dtype=torch.int64)
    for s, e in bounds:
        bits = scratch.abs_bits(scratch.task_vector(i, theta, base, s, e))
        hist += torch.bincount(torch.bitwise_right_shift(bits, 16, out=scratch.key[: e - s]), minlength=_RADIX_HI)
    b, above = _rank_bin(hist, k)
    per_chunk = torch.empty(len(bounds), _RADIX_LO, dtype=torch.int64)
    for j, (s, e) in enumerate(bounds):
        bits = scratch.abs_bits(scratch.task_vector(i, theta, base, s, e))
        key = torch.sub(bits, b << 16, out=scratch.key[: e - s]).clamp_(-1, _RADIX_LO).add_(1)  # bin b → 1.._RADIX_LO
        per_chunk[j] = torch.bincount(key, minlength=_RADIX_LO + 2)[1 : _RADIX_LO + 1]
    c, above_c = _rank_bin(per_chunk.sum(0), k - above)
    t = float(torch.tensor((b << 16) | c, dtype=torch.int32).view(torch.float32))
    return _tie_cut(theta, base, t, k - above - above_c, per_chunk[:, c], bounds, scratch, i)


def _apply_trim_(tau: Tensor, t: float, p: int, s: int) -> Tensor:
    """Trim the chunk ``tau = τ[s : s + len]`` in place by the plan ``(t, p)`` (``hardshrink`` keeps ``|x| > λ``)."""
    if t <= 0:
        return tau
    m = tau.numel()
    cut = min(max(p - s, 0), m)
    if cut > 0:  # |x| > nextafter(t, 0) ⟺ |x| >= t in float32
        below = _below(t)
        torch.hardshrink(tau[:cut], below, out=tau[:cut])
    if cut < m:
        torch.hardshrink(tau[cut:], t, out=tau[cut:])
    return tau


def _ties_chunked(tensors: Sequence[Tensor], base: Tensor, w: list[float], lam: float, ks: list[int] | None,
                  thresholds: Sequence[float] | None, normalize: bool, out_dtype: torch.dtype) -> Tensor:
    """TIES in float32 on CPU, chunk by chunk: one trim plan per model (``thresholds``: keep ``|τ| >= t_i``, ties
    included; else exactly ``ks[i]``), then trim, elect and disjoint mean in one pass over the chunks, each chunk
    rounded once to ``out_dtype``. Bit-identical to the generic path (:func:`_disjoint_merge` over
    :func:`_trim_to_count_`), which ``tests/test_merge_methods.py`` checks against a slow reference."""
    flat = [t.reshape(-1) for t in tensors]
    base_flat = base.reshape(-1)
    n = base_flat.numel()
    scratch = _TiesScratch(len(flat), max(1, min(n, TIES_CHUNK)))
    if thresholds is not None:
        plans = [(float(t), n) for t in thresholds]
    else:
        plans = [_trim_plan(x, base_flat, k, scratch, i) for i, (x, k) in enumerate(zip(flat, ks))]
    out = torch.empty(n, dtype=out_dtype, device=base.device)
    wmin = min((x for x in w if x > 0), default=1.0)
    for s in range(0, n, TIES_CHUNK):
        e = min(s + TIES_CHUNK, n)
        m = e - s
        scratch.base[:m].copy_(base_flat[s:e])
        taus = [_apply_trim_(scratch.task_vector(i, x, base_flat, s, e, base_ready=True), *plans[i], s) for i, x in enumerate(flat)]
        sign = scratch.key[:m].view(torch.float32)  # the int32 scratch, reused
        if w[0] == 1 and len(taus) > 1:  # 1 · τ_0 = τ_0 exactly: the first sum w_1 τ_1 + τ_0 without a product pass
            torch.add(taus[0], taus[1], alpha=w[1], out=sign)
        else:
            torch.mul(taus[0], w[0], out=sign)
        for i in range(2 if w[0] == 1 and len(taus) > 1 else 1, len(taus)):
            sign.add_(taus[i], alpha=w[i])
        sign.sign_()
        num, den = scratch.num[:m].zero_(), scratch.den[:m]
        for i, tau in enumerate(taus):
            tau.mul_(sign).clamp_min_(0)  # |τ̂_i| where it agrees with γ, else 0 (or −0)
            num.add_(tau, alpha=w[i])
            if normalize and i == 0:  # w_0 sign(τ̂_0) = 0 + w_0 sign(τ̂_0) but for the sign of zeros, which the clamp erases
                torch.sign(tau, out=den)
                if w[0] != 1:
                    den.mul_(w[0])
            elif normalize:
                den.add_(tau.sign_(), alpha=w[i])
        num.mul_(sign)
        if normalize:  # den = 0 only where num = 0 (no model agrees); elsewhere den >= the smallest positive weight
            den.clamp_min_(wmin)
        if normalize and lam == 1:  # base + 1 · num / den in one pass, rounded as num.div_(den).add_(base) (1 · num is exact)
            torch.addcdiv(scratch.base[:m], num, den, out=num)
        else:
            if normalize:
                num.div_(den)
            if lam != 1:  # x · 1 = x exactly: skip the pass
                num.mul_(lam)
            num.add_(scratch.base[:m])
        out[s:e].copy_(num)
    return out.view(base.shape)
