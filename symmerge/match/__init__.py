"""Which element: exact solvers (LAP, Procrustes, quartic, head assignment) over canonical tensors, and the
matchers built on them — ``weights``, ``activations``, ``learned`` — registered by name in :data:`MATCHERS`."""

# importing the matcher modules registers them, in the order --match lists them
from symmerge.match import weights, activations, learned  # noqa: F401, I001
from symmerge.match.attention import match_heads, rotation_and_scale
from symmerge.match.device import DEVICES, resolve_device
from symmerge.match.ffn import ffn_similarity
from symmerge.match.fit import MATCHERS, Fit, get_matcher, matcher
from symmerge.match.lap import lap_backend, solve_lap
from symmerge.match.objective import squared_distances, state_distance, state_norm
from symmerge.match.per_layer import fit_per_layer
from symmerge.match.procrustes import best_scale, nuclear_norm, procrustes
from symmerge.match.residual import fit_with_residual, solve_residual

__all__ = [
    "DEVICES", "MATCHERS", "Fit", "best_scale", "ffn_similarity", "fit_per_layer", "fit_with_residual", "get_matcher", "lap_backend",
    "match_heads", "matcher", "nuclear_norm", "procrustes", "resolve_device", "rotation_and_scale", "solve_lap", "solve_residual",
    "squared_distances", "state_distance", "state_norm",
]
