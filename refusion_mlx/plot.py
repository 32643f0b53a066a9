"""The speed-vs-accuracy figure: matplotlib when it is installed, else a small PNG writer of our own."""

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import RefusionError


def plot_backend() -> str:
    """Which plotter draws the figure: matplotlib if importable, else our PNG writer (numpy + zlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "built-in PNG writer"
    return "matplotlib"


def plot(scores: Sequence, path: str) -> str:
    """Speed (tokens/s) against accuracy of ``scores`` (evaluate.Score) as a PNG; returns the backend used."""
    points = [(str(k), s.tokens_per_second, 100 * s.accuracy, k == 0) for k, s in enumerate(scores)]
    backend = plot_backend()
    try:
        if backend == "matplotlib":
            plot_matplotlib(points, path)
        else:
            write_png(path, scatter_image(points))
    except OSError as e:
        raise RefusionError(f"cannot write the plot {path}: {e.strerror or e}") from None
    return backend


def plot_matplotlib(points, path: str):
    """The figure with matplotlib: left-to-right in red, plan-and-infill settings in blue, numbered."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for label, x, y, is_ar in points:
        ax.scatter([x], [y], s=60, color="tab:red" if is_ar else "tab:blue", zorder=3,
                   label=("left-to-right" if is_ar else None))
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.scatter([], [], color="tab:blue", label="plan-and-infill (numbers: table rows)")
    ax.set_xlabel("tokens/s")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(0, max([p[1] for p in points] + [1e-9]) * 1.15)
    ax.set_ylim(0, 105)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# The fallback figure: a 3x5 pixel font, enough for tick values, axis titles and the legend.
GLYPHS = dict(zip(
    "0123456789.%/-:,=() ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    ("###,#.#,#.#,#.#,###", ".#.,##.,.#.,.#.,###", "###,..#,###,#..,###", "###,..#,.##,..#,###",
     "#.#,#.#,###,..#,..#", "###,#..,###,..#,###", "###,#..,###,#.#,###", "###,..#,.#.,.#.,.#.",
     "###,#.#,###,#.#,###", "###,#.#,###,..#,###", "...,...,...,...,.#.", "#.#,..#,.#.,#..,#.#",
     "..#,..#,.#.,#..,#..", "...,...,###,...,...", "...,.#.,...,.#.,...", "...,...,...,.#.,#..",
     "...,###,...,###,...", ".#.,#..,#..,#..,.#.", ".#.,..#,..#,..#,.#.", "...,...,...,...,...",
     ".#.,#.#,###,#.#,#.#", "##.,#.#,##.,#.#,##.", "###,#..,#..,#..,###", "##.,#.#,#.#,#.#,##.",
     "###,#..,##.,#..,###", "###,#..,##.,#..,#..", "###,#..,#.#,#.#,###", "#.#,#.#,###,#.#,#.#",
     "###,.#.,.#.,.#.,###", "..#,..#,..#,#.#,###", "#.#,##.,#..,##.,#.#", "#..,#..,#..,#..,###",
     "#.#,###,###,#.#,#.#", "##.,#.#,#.#,#.#,#.#", ".#.,#.#,#.#,#.#,.#.", "###,#.#,###,#..,#..",
     ".#.,#.#,#.#,##.,.##", "##.,#.#,##.,#.#,#.#", ".##,#..,.#.,..#,##.", "###,.#.,.#.,.#.,.#.",
     "#.#,#.#,#.#,#.#,###", "#.#,#.#,#.#,#.#,.#.", "#.#,#.#,###,###,#.#", "#.#,#.#,.#.,#.#,#.#",
     "#.#,#.#,.#.,.#.,.#.", "###,..#,.#.,#..,###"),
))
LEGEND = "RED: LEFT-TO-RIGHT   BLUE N: TABLE ROW N"
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 640, 480, 70, 30, 30, 60
BLUE, RED, GRID, BLACK = (31, 119, 180), (214, 39, 40), (225, 225, 225), (0, 0, 0)


def draw_text(image, text: str, x: int, y: int, color=BLACK, scale: int = 2):
    """Stamp ``text`` with its top-left corner at (x, y); unknown characters are left blank."""
    for i, char in enumerate(text.upper()):
        rows = GLYPHS.get(char, GLYPHS[" "]).split(",")
        for r, row in enumerate(rows):
            for c, bit in enumerate(row):
                if bit == "#":
                    top, left = y + r * scale, x + (4 * i + c) * scale
                    image[max(top, 0):top + scale, max(left, 0):left + scale] = color


def nice_step(span: float) -> float:
    """A 1-2-5 tick step giving about five ticks over ``span``."""
    import math

    raw = max(span, 1e-9) / 5
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def scatter_image(points) -> np.ndarray:
    """RGB image of the scatter: axes, grid, ticks, numbered points (left-to-right in red)."""
    image = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)
    x_max = max([p[1] for p in points] + [1e-9]) * 1.15
    step = nice_step(x_max)
    x_max = step * np.ceil(x_max / step)
    width, height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def to_pixel(x, y):
        return LEFT + int(round(x / x_max * width)), TOP + height - int(round(y / 100 * height))

    for k in range(int(round(x_max / step)) + 1):
        px, _ = to_pixel(k * step, 0)
        image[TOP:TOP + height, px] = GRID
        label = f"{k * step:g}"
        draw_text(image, label, px - 4 * len(label), TOP + height + 8)
    for y in range(0, 101, 20):
        _, py = to_pixel(0, y)
        image[py, LEFT:LEFT + width] = GRID
        draw_text(image, str(y), LEFT - 8 - 8 * len(str(y)), py - 5)
    image[TOP:TOP + height + 1, LEFT] = BLACK
    image[TOP + height, LEFT:LEFT + width + 1] = BLACK
    draw_text(image, "TOKENS/S", LEFT + width // 2 - 32, HEIGHT - 24)
    draw_text(image, "ACCURACY %", 8, 8)
    draw_text(image, LEGEND, WIDTH - RIGHT - 8 * len(LEGEND), 8)
    for label, x, y, is_ar in points:
        px, py = to_pixel(x, y)
        color = RED if is_ar else BLUE
        image[max(py - 4, 0):py + 5, max(px - 4, 0):px + 5] = color
        draw_text(image, "AR" if is_ar else label, px + 7, py - 14, color)
    return image


def write_png(path: str, image) -> None:
    """Write an RGB uint8 array as a PNG (filter 0 on every row, one zlib stream)."""
    import struct
    import zlib

    height, width, _ = image.shape
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
           + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
