"""The speed-vs-accuracy figure, drawn with matplotlib (the ``plot`` extra)."""

from typing import List, Sequence, Tuple

from .errors import RefusionError

MISSING = "--plot needs matplotlib: pip install 'refusion-mlx[plot]' (or pip install matplotlib)"
# Where a point's number may go, in points from the point, tried in order until one is free.
LABEL_OFFSETS = [(6, 6), (6, -14), (-16, 6), (-16, -14), (6, 18), (-16, 18), (6, -26), (-16, -26),
                 (18, 0), (-28, 0)]


def check_matplotlib():
    """Raise the one-line error when matplotlib is missing (before a long evaluation, not after)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RefusionError(MISSING) from None


def figure(points: Sequence[Tuple[str, float, float, bool]]):
    """A matplotlib figure: left-to-right in red, plan-and-infill settings in blue, each numbered
    by its table row; numbers are placed where they overlap neither each other nor the points."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for _, x, y, is_ar in points:
        ax.scatter([x], [y], s=60, color="tab:red" if is_ar else "tab:blue", zorder=3,
                   label=("left-to-right" if is_ar else None))
    ax.scatter([], [], color="tab:blue", label="plan-and-infill (numbers: table rows)")
    ax.set_xlabel("tokens/s")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(0, max([p[1] for p in points] + [1e-9]) * 1.15)
    ax.set_ylim(0, 105)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    place_labels(fig, ax, points)
    return fig


def place_labels(fig, ax, points):
    """Annotate each point with the first offset whose box is clear of the labels and points so far."""
    renderer = fig.canvas.get_renderer()
    taken: List = [ax.transData.transform((x, y)) for _, x, y, _ in points]  # point centres, pixels
    boxes = []
    radius = 5  # a marker's half-size in pixels (s=60 points^2)
    for label, x, y, _ in points:
        for dx, dy in LABEL_OFFSETS:
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy))
            box = text.get_window_extent(renderer).expanded(1.1, 1.1)
            clear = not any(box.overlaps(b) for b in boxes) and not any(
                box.x0 - radius < px < box.x1 + radius and box.y0 - radius < py < box.y1 + radius
                for px, py in taken)
            if clear or (dx, dy) == LABEL_OFFSETS[-1]:
                boxes.append(box)
                break
            text.remove()


def save_figure(points: Sequence[tuple], path: str, what: str):
    """``figure(points)`` written to ``path`` as a PNG; a path that cannot be written is one error
    naming ``what`` (the flag or file the user gave)."""
    import matplotlib.pyplot as plt

    fig = figure(points)
    try:
        fig.savefig(path)
    except OSError as e:
        raise RefusionError(f"cannot write {what} {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def plot(scores: Sequence, path: str) -> str:
    """Speed (tokens/s) against accuracy of ``scores`` (evaluate.Score), saved as a PNG."""
    save_figure([(str(k), s.tokens_per_second, 100 * s.accuracy, k == 0) for k, s in enumerate(scores)],
                path, "the plot")
    return "matplotlib"
