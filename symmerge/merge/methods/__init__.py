"""Registered merge methods: pure per-tensor functions, and a registry that describes and validates them.

Every method is a function ``fn(tensors, *, base=None, weights=None, name=None, **params, **data) -> Tensor``:

- ``tensors``: one tensor per model, all the same shape (already aligned by symmerge);
- ``base``: the common ancestor's tensor (methods with ``needs_base``; used when given by ``optional_base`` ones —
  slerp, nuslerp, multislerp; ignored by the others);
- ``weights``: one float per model (``None`` = 1 for every model);
- ``name``: the tensor's name in the state dict: seeds DARE's masks and labels error messages;
- ``params``: the method's registered parameters (see :func:`validate_params`); ``per_model`` ones (``density``,
  ``gamma``, ``epsilon``, ``scale``) take a scalar or one value per model;
- ``data``: per-model statistics for the ``needs_data`` methods (``fishers=``, ``grams=``) and precomputed TIES
  ``thresholds=``.

The math runs in float32 (float64 when an input is float64; RegMean's solve always in float64) and the result is
rounded once, to ``out_dtype`` (every method takes it; default: the dtype of ``tensors[0]``; the engine passes the
output dtype). Inputs are never modified. Functions keep at most a few tensor-sized
float32 buffers alive at once whatever the number of models: task vectors ``θ_i − base`` are recomputed rather
than stacked, and masks are applied in place, because these run on 7B-scale tensors.

The registry: :data:`MERGE_METHODS` maps a name to a :class:`MergeMethod` (parameters with defaults and checks,
model-count and base/data requirements, a one-line description), filled by :func:`merge_method`. A recipe is
checked with :func:`get_method`, :meth:`MergeMethod.check_models` and :func:`validate_params` before any weight is
read.

The package, in the order a reader needs it: :mod:`~symmerge.merge.methods.registry` (declarations and checks),
:mod:`~symmerge.merge.methods.common` (input checks, dtypes, chunked and float64 reductions),
:mod:`~symmerge.merge.methods.sparsify` (top-k thresholds, the TIES kernel), then the methods by family —
:mod:`~symmerge.merge.methods.generalized_task_arithmetic`, :mod:`~symmerge.merge.methods.interpolation`,
:mod:`~symmerge.merge.methods.anchored`, :mod:`~symmerge.merge.methods.with_data`. Importing the package imports
every family, which registers its methods.
"""

from symmerge.merge.methods.anchored import arcee_fusion, model_stock, nearswap, passthrough, ram, ramplus_tl, sce
from symmerge.merge.methods.common import INT8_MASK_NOTE
from symmerge.merge.methods.generalized_task_arithmetic import (
    RESCALE_EPS,
    WEIGHT_SUM_EPS,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_seed,
    dare_task_vector,
    dare_ties,
    della,
    della_keep_probabilities,
    della_linear,
    task_arithmetic,
    ties,
)
from symmerge.merge.methods.interpolation import PARALLEL_TOL, ZERO_NORM, karcher, linear, multislerp, nuslerp, slerp
from symmerge.merge.methods.registry import MERGE_METHODS, Bool, Choice, Float, Int, MergeMethod, ParamSpec, get_method, list_methods, merge_method, validate_params
from symmerge.merge.methods.sparsify import EXACT_DIRECT_MAX, TIES_CHUNK, global_magnitude_thresholds, keep_count, kth_largest, magnitude_threshold
from symmerge.merge.methods.with_data import FISHER_EPS, REGMEAN_RTOL, fisher, fisher_model_norms, regmean

__all__ = [
    "EXACT_DIRECT_MAX", "FISHER_EPS", "INT8_MASK_NOTE", "MERGE_METHODS", "PARALLEL_TOL", "REGMEAN_RTOL", "RESCALE_EPS", "TIES_CHUNK", "WEIGHT_SUM_EPS", "ZERO_NORM",
    "Bool", "Choice", "Float", "Int", "MergeMethod", "ParamSpec", "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear",
    "dare_seed", "dare_task_vector", "dare_ties", "della", "della_keep_probabilities", "della_linear", "fisher", "fisher_model_norms",
    "get_method", "global_magnitude_thresholds", "karcher", "keep_count", "kth_largest", "linear", "list_methods", "magnitude_threshold",
    "merge_method", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl", "regmean", "sce", "slerp",
    "task_arithmetic", "ties", "validate_params",
]
