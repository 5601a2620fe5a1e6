"""Merge methods: registered per-tensor functions over aligned tensors (see :mod:`symmerge.merge.methods`)."""

from symmerge.merge.methods import (
    MERGE_METHODS,
    Bool,
    Choice,
    Float,
    Int,
    MergeMethod,
    ParamSpec,
    dare_linear,
    dare_seed,
    dare_task_vector,
    dare_ties,
    fisher,
    fisher_model_norms,
    get_method,
    global_magnitude_thresholds,
    keep_count,
    linear,
    list_methods,
    magnitude_threshold,
    merge_method,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    validate_params,
)

__all__ = [
    "MERGE_METHODS", "Bool", "Choice", "Float", "Int", "MergeMethod", "ParamSpec", "dare_linear", "dare_seed",
    "dare_task_vector", "dare_ties", "fisher", "fisher_model_norms", "get_method", "global_magnitude_thresholds",
    "keep_count", "linear", "list_methods", "magnitude_threshold", "merge_method", "regmean", "slerp",
    "task_arithmetic", "ties", "validate_params",
]
