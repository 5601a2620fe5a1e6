"""Evaluation (docs/DESIGN.md §4): parameter distances grouped by the spec, interpolation curves, loss barriers and
landscapes, plots (:mod:`symmerge.evaluate.plots`, imported on its own: it needs matplotlib)."""

from symmerge.evaluate.barrier import Setting, Study, landscape, model_for, run_study
from symmerge.evaluate.distance import grouped_distance
from symmerge.evaluate.interpolation import Curve, interpolate, interpolation_curve
from symmerge.evaluate.tasks import Evaluator, make_evaluator

__all__ = ["Curve", "Evaluator", "Setting", "Study", "grouped_distance", "interpolate", "interpolation_curve", "landscape",
           "make_evaluator", "model_for", "run_study"]
