"""Plots: interpolation curves (one per alignment setting) and the 2-D loss landscape through A, B and B'."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from symmerge.errors import SymmergeError
from symmerge.evaluate.interpolation import Curve

try:  # the ``plots`` extra
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg
except ImportError:  # pragma: no cover - exercised only without matplotlib
    plt = FigureCanvasAgg = None


def _pyplot():
    if plt is None:
        raise SymmergeError("plots need matplotlib: pip install 'symmerge[plots]' (or pip install matplotlib)")
    return plt


def check_plot_path(path: Path, option: str) -> None:
    """A file name whose suffix names a format matplotlib writes (.png, .pdf, .svg...), or a one-line error."""
    _pyplot()
    formats = FigureCanvasAgg.get_supported_filetypes()  # the backend's formats, without opening (or closing) a figure
    if Path(path).suffix.lower().lstrip(".") not in formats:
        raise SymmergeError(f"{option} {path}: give a file name ending in .png (or one of {', '.join('.' + f for f in sorted(formats))})")


def plot_curves(curves: Sequence[Curve], path: Path, title: str = "") -> Path:
    """Loss (and accuracy, when measured) along θ(t) = (1 − t) A + t B', one line per alignment setting."""
    with_accuracy = all("accuracy" in m for c in curves for m in c.metrics)
    fig, axes = _pyplot().subplots(1, 2 if with_accuracy else 1, figsize=(11 if with_accuracy else 6, 4), squeeze=False)
    for c in curves:
        axes[0, 0].plot(c.ts, c.losses, marker="o", label=f"{c.label} (barrier {c.barrier():.3f})")
        if with_accuracy:
            axes[0, 1].plot(c.ts, [m["accuracy"] for m in c.metrics], marker="o", label=c.label)
    axes[0, 0].set(xlabel="t  (0 = A, 1 = B aligned to A)", ylabel="loss", title="loss along the linear path")
    axes[0, 0].legend(fontsize=8)
    if with_accuracy:
        axes[0, 1].set(xlabel="t", ylabel="accuracy", title="accuracy along the linear path")
        axes[0, 1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_landscape(us, vs, losses, points: dict[str, tuple[float, float]], path: Path, title: str = "") -> Path:
    """Loss on the plane through A, B and B' (the seed paper's Figure 5); ``points`` marks the three models."""
    fig, ax = _pyplot().subplots(figsize=(6, 5))
    contour = ax.contourf(us, vs, losses, levels=30, cmap="viridis")
    fig.colorbar(contour, ax=ax, label="loss")
    for name, (u, v) in points.items():
        ax.plot(u, v, "w*", markersize=12)
        ax.annotate(name, (u, v), textcoords="offset points", xytext=(6, 6), color="white")
    ax.set(xlabel="direction A → B (unaligned)", ylabel="orthogonal direction (towards B')", title=title or "loss landscape")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
