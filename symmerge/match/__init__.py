"""Which element: exact solvers (LAP, Procrustes, quartic, head assignment) over canonical tensors."""

from symmerge.match.attention import match_heads, rotation_and_scale
from symmerge.match.ffn import ffn_similarity
from symmerge.match.lap import lap_backend, solve_lap
from symmerge.match.procrustes import best_scale, nuclear_norm, procrustes

__all__ = ["best_scale", "ffn_similarity", "lap_backend", "match_heads", "nuclear_norm", "procrustes", "rotation_and_scale", "solve_lap"]
