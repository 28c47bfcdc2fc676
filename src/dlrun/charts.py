"""The pictures every run draws at its end, with Pillow (torchvision's own image library): the
learning curves, and the confusion matrix or the predicted-vs-true scatter. They are plain charts;
drawn with matplotlib (its import, layout and rendering) they were most of the default run's time
after training (bench/post_training.py). matplotlib still draws what needs its layout engine:
dlrun-report's comparisons and dlrun-explain's grids (plots.py). Pillow's built-in font is scalable
where Pillow has FreeType, as its wheels do (pillow>=10.1).

A `Canvas` is drawn at SCALE times its size and reduced once at the end, so lines, markers and text
come out smooth; every coordinate given to it is in pixels of the final picture.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dlrun.rundir import RunDir, read_metrics, write_bytes

SCALE = 2
ANNOTATE_UP_TO = 20  # classes: beyond this the confusion matrix shows colours only
GRID, AXIS, TEXT = (224, 224, 224), (60, 60, 60), (20, 20, 20)
# matplotlib's default colour cycle (tab10), so the run's pictures and dlrun-report's look alike
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf"]
# ColorBrewer's 9-class Blues (matplotlib's "Blues"), interpolated linearly from white to dark blue
BLUES = np.array([[247, 251, 255], [222, 235, 247], [198, 219, 239], [158, 202, 225], [107, 174, 214],
                  [66, 146, 198], [33, 113, 181], [8, 81, 156], [8, 48, 107]], dtype=float)


def blues(share: np.ndarray) -> np.ndarray:
    """RGB (…, 3) uint8 for shares in 0..1 on a square-root scale, so that confusions of a few
    percent still show among 100 classes."""
    t = np.sqrt(np.clip(share, 0.0, 1.0)) * (len(BLUES) - 1)
    low = np.minimum(t.astype(int), len(BLUES) - 2)
    frac = (t - low)[..., None]
    return np.rint(BLUES[low] * (1 - frac) + BLUES[low + 1] * frac).astype(np.uint8)


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


class Canvas:
    """A white picture of `size` pixels; text in Pillow's own scalable font (no font files needed)."""

    def __init__(self, size: tuple[int, int]):
        from PIL import Image, ImageDraw

        self.size = size
        self.image = Image.new("RGB", (size[0] * SCALE, size[1] * SCALE), "white")
        self.draw = ImageDraw.Draw(self.image, "RGBA")
        self.fonts: dict[float, Any] = {}

    def font(self, px: float) -> Any:
        if px not in self.fonts:
            from PIL import ImageFont

            self.fonts[px] = ImageFont.load_default(size=px * SCALE)
        return self.fonts[px]

    def width(self, text: str, px: float) -> float:
        return self.font(px).getlength(text) / SCALE

    def _xy(self, points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * SCALE, y * SCALE) for x, y in points]

    def line(self, points: Sequence[tuple[float, float]], colour: Any, width: float = 1.0) -> None:
        self.draw.line(self._xy(points), fill=colour, width=max(1, round(width * SCALE)), joint="curve")

    def dotted(self, start: tuple[float, float], end: tuple[float, float], colour: Any, step: float = 4.0) -> None:
        length = math.dist(start, end) or 1.0
        for i in range(int(length // step) + 1):
            a, b = i * step / length, min((i * step + step / 2) / length, 1.0)
            self.line([(start[0] + a * (end[0] - start[0]), start[1] + a * (end[1] - start[1])),
                       (start[0] + b * (end[0] - start[0]), start[1] + b * (end[1] - start[1]))], colour, 1.2)

    def rect(self, box: tuple[float, float, float, float], fill: Any = None, outline: Any = None) -> None:
        self.draw.rectangle([c * SCALE for c in box], fill=fill, outline=outline, width=SCALE if outline else 0)

    def dot(self, centre: tuple[float, float], radius: float, colour: Any) -> None:
        x, y = centre
        self.draw.ellipse([(x - radius) * SCALE, (y - radius) * SCALE, (x + radius) * SCALE, (y + radius) * SCALE],
                          fill=colour)

    def text(self, xy: tuple[float, float], text: str, px: float, anchor: str = "la", colour: Any = TEXT) -> None:
        """`anchor`: Pillow's two letters, horizontal (l, m, r) then vertical (a: top, m: middle, d: bottom)."""
        self.draw.text((xy[0] * SCALE, xy[1] * SCALE), text, font=self.font(px), fill=colour, anchor=anchor)

    def vertical_text(self, xy: tuple[float, float], text: str, px: float, anchor: str = "mm") -> None:
        """Text read bottom to top; `anchor` places the turned text's box as `text` does (its end is at the top)."""
        from PIL import Image, ImageDraw

        font = self.font(px)
        left, top, right, bottom = font.getbbox(text)
        mask = Image.new("L", (right - left + 2, bottom - top + 2))
        ImageDraw.Draw(mask).text((1 - left, 1 - top), text, font=font, fill=255)
        mask = mask.rotate(90, expand=True)
        w, h = mask.size
        x = xy[0] * SCALE - {"l": 0, "m": w / 2, "r": w}[anchor[0]]
        y = xy[1] * SCALE - {"a": 0, "m": h / 2, "d": h}[anchor[1]]
        self.image.paste(TEXT, (round(x), round(y)), mask)

    def title_lines(self, text: str, px: float = 13, width: float | None = None) -> list[str]:
        """`text` wrapped to `width` (the picture's width)."""
        chars = max(20, int(len(text) * ((width or self.size[0]) - 20) / max(self.width(text, px), 1)))
        return textwrap.wrap(text, chars) or [""]

    def title(self, text: str, px: float = 13) -> float:
        """The title centred at the top, wrapped to the picture's width; returns where it ends (y)."""
        lines = self.title_lines(text, px)
        for i, line in enumerate(lines):
            self.text((self.size[0] / 2, 8 + i * px * 1.3), line, px, "ma")
        return 8 + len(lines) * px * 1.3

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.reduce(SCALE).save(buffer, format="PNG", compress_level=1)  # box filter: fast and smooth
        return buffer.getvalue()


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) within [low, high], about `count` of them."""
    if not high > low:
        return [low]
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def tick_label(value: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value) or 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


class Panel:
    """A plot area `box` (left, top, right, bottom, in pixels) on a canvas, with the data ranges it shows."""

    def __init__(self, canvas: Canvas, box: tuple[float, float, float, float], xs: Sequence[float],
                 ys: Sequence[float], integer_x: bool = False):
        self.canvas, self.box = canvas, box
        self.x_range, self.y_range = padded(xs, 0.05), padded(ys, 0.06)
        self.x_ticks = nice_ticks(*self.x_range, count=6, integer=integer_x)
        self.y_ticks = nice_ticks(*self.y_range, count=5)
        self.points: list[tuple[float, float]] = []

    def at(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    def axes(self, x_label: str, y_label: str) -> None:
        """Grid lines and labelled ticks on both axes, the frame, the axes' labels."""
        c, (left, top, right, bottom) = self.canvas, self.box
        for x in self.x_ticks:
            px = self.at(x, 0)[0]
            c.line([(px, top), (px, bottom)], GRID)
            c.text((px, bottom + 4), tick_label(x, self.x_ticks), 10, "ma")
        for y in self.y_ticks:
            py = self.at(0, y)[1]
            c.line([(left, py), (right, py)], GRID)
            c.text((left - 4, py), tick_label(y, self.y_ticks), 10, "rm")
        c.rect(self.box, outline=AXIS)
        c.text(((left + right) / 2, bottom + 20), x_label, 11, "ma")
        widest = max(c.width(tick_label(y, self.y_ticks), 10) for y in self.y_ticks)
        c.vertical_text((left - widest - 10, (top + bottom) / 2), y_label, 11, "rm")

    def plot(self, points: Sequence[tuple[float, float]], colour: str, markers: bool = True, width: float = 1.5) -> None:
        pixels = [self.at(x, y) for x, y in points]
        for (x0, y0), (x1, y1) in zip(pixels, pixels[1:]):  # the legend keeps clear of the lines too
            steps = max(1, int(math.dist((x0, y0), (x1, y1)) // 8))
            self.points += [(x0 + (x1 - x0) * t / steps, y0 + (y1 - y0) * t / steps) for t in range(steps)]
        self.points += pixels
        if len(pixels) > 1:
            self.canvas.line(pixels, colour, width)
        for p in pixels if markers else ():
            self.canvas.dot(p, 2.5, colour)

    def vertical_dotted(self, x: float, colour: Any) -> None:
        """A dotted line across the plot area at `x` (the legend keeps clear of it where it can)."""
        (px, bottom), (_, top) = self.at(x, self.y_range[0]), self.at(x, self.y_range[1])
        self.canvas.dotted((px, bottom), (px, top), colour)
        self.points += [(px, y) for y in np.linspace(top, bottom, 20)]

    def scatter(self, points: Sequence[tuple[float, float]], colour: str, radius: float = 2.0) -> None:
        pixels = [self.at(x, y) for x, y in points]
        self.points += pixels
        fill = (*hex_rgb(colour), 128)  # half transparent: dense regions show darker
        for p in pixels:
            self.canvas.dot(p, radius, fill)

    def legend(self, entries: Sequence[tuple[str, Any, str]]) -> tuple[float, float]:
        """(label, colour, style: "line" | "dotted" | "dot") in a box, in the corner that covers the fewest
        of the points and lines drawn (the first such of top right, top left, bottom right, bottom left);
        returns the box's top-left corner."""
        c, (left, top, right, bottom) = self.canvas, self.box
        w = 34 + max(c.width(label, 10) for label, _, _ in entries)
        h = 6 + 15 * len(entries)
        corners = [(right - w - 6, top + 6), (left + 6, top + 6), (right - w - 6, bottom - h - 6),
                   (left + 6, bottom - h - 6)]
        x, y = min(corners, key=lambda xy: sum(xy[0] - 4 <= px <= xy[0] + w + 4 and xy[1] - 4 <= py <= xy[1] + h + 4
                                               for px, py in self.points))
        c.rect((x, y, x + w, y + h), fill=(255, 255, 255, 220), outline=GRID)
        for i, (label, colour, style) in enumerate(entries):
            cy = y + 10.5 + 15 * i
            if style == "dotted":
                c.dotted((x + 6, cy), (x + 26, cy), colour, 3.0)
            elif style == "dot":
                c.dot((x + 16, cy), 3, colour)
            else:
                c.line([(x + 6, cy), (x + 26, cy)], colour, 1.5)
            c.text((x + 30, cy), label, 10, "lm")
        return x, y


def padded(values: Sequence[float], share: float) -> tuple[float, float]:
    low, high = (min(values), max(values)) if len(values) else (0.0, 1.0)
    span = high - low or abs(high) or 1.0
    return low - share * span, high + share * span


# ------------------------------------------------------------ the run's pictures


def curves(records: Sequence[dict[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    """Per split (train, val) the (epoch, value) points of `metric`; a diverged epoch's inf or NaN is left out."""
    splits = sorted({k.split("/", 1)[0] for r in records for k in r if k.endswith("/" + metric)})
    return {s: [(r["epoch"], r[f"{s}/{metric}"]) for r in records if math.isfinite(r.get(f"{s}/{metric}", math.nan))]
            for s in splits}


def learning_curves(records: Sequence[dict[str, Any]], best_epoch: int | None, title: str) -> bytes:
    """Loss and the second metric (accuracy or MAE) per epoch, a panel each, train and val as lines,
    the best epoch as a dotted line, titled (wrapped) with the run's name and overrides."""
    metrics = sorted({k.split("/", 1)[1] for r in records for k in r if "/" in k}, key=lambda m: m != "loss")
    canvas = Canvas((500 * max(len(metrics), 1), 380))
    top = canvas.title(title) + 10
    epochs = [r["epoch"] for r in records]
    for i, metric in enumerate(metrics):
        series = curves(records, metric)
        values = [v for points in series.values() for _, v in points]
        panel = Panel(canvas, (500 * i + 70, top, 500 * i + 485, 380 - 45), epochs, values, integer_x=True)
        panel.axes("epoch", metric)
        entries = []
        for colour, (split, points) in zip(TAB10, series.items()):
            panel.plot(points, colour)
            entries.append((split, colour, "line"))
        if best_epoch is not None:
            panel.vertical_dotted(best_epoch, (128, 128, 128))
            entries.append((f"best epoch ({best_epoch})", (128, 128, 128), "dotted"))
        panel.legend(entries)
    return canvas.png()


def confusion_matrix(matrix: Sequence[Sequence[int]], names: Sequence[str], title: str) -> bytes:
    """Rows (true classes) normalised to sum 1 and coloured by that share (square-root scale, with
    its colour bar); the counts written in the cells when there are at most ANNOTATE_UP_TO classes;
    class names on both axes."""
    counts = np.asarray(matrix, dtype=np.int64).reshape(len(names), len(names))
    k = len(names)
    support = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
    cell = round(min(48.0, max(16.0, 720.0 / max(k, 1))))  # whole pixels: the cells are an exact grid
    font = min(12.0, max(8.0, 0.55 * cell))
    grid = cell * k
    probe = Canvas((1, 1))  # to measure text before the picture's size is known
    label = max((probe.width(n, font) for n in names), default=0.0)
    left = 30 + label + 8
    width = int(max(left + grid + 110, 420))
    top = 8 + len(probe.title_lines(title, 13, width)) * 13 * 1.3 + 12
    canvas = Canvas((width, int(top + grid + label + 34)))
    canvas.title(title)
    if k:
        from PIL import Image

        cells = Image.fromarray(blues(shares)).resize((grid * SCALE, grid * SCALE), Image.Resampling.NEAREST)
        canvas.image.paste(cells, (round(left * SCALE), round(top * SCALE)))
    canvas.rect((left, top, left + grid, top + grid), outline=AXIS)
    for i, name in enumerate(names):
        middle = i * cell + cell / 2
        canvas.text((left - 5, top + middle), name, font, "rm")
        canvas.vertical_text((left + middle, top + grid + 5), name, font, "ma")
    if k <= ANNOTATE_UP_TO:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                canvas.text((left + j * cell + cell / 2, top + i * cell + cell / 2), str(count), min(font, 11), "mm",
                            "white" if shares[i, j] > 0.4 else TEXT)
    canvas.vertical_text((12, top + grid / 2), "true class", 11, "lm")
    canvas.text((left + grid / 2, top + grid + 5 + label + 8), "predicted class", 11, "ma")
    colour_bar(canvas, (left + grid + 20, top, left + grid + 34, top + grid))
    return canvas.png()


def colour_bar(canvas: Canvas, box: tuple[float, float, float, float]) -> None:
    """The share-to-colour scale beside the matrix, 0 at the bottom, ticks at 0, 0.2, ..., 1."""
    from PIL import Image

    left, top, right, bottom = box
    rows = round((bottom - top) * SCALE)
    column = blues(np.linspace(1.0, 0.0, rows))[:, None, :].repeat(round((right - left) * SCALE), axis=1)
    canvas.image.paste(Image.fromarray(np.ascontiguousarray(column)), (round(left * SCALE), round(top * SCALE)))
    canvas.rect(box, outline=AXIS)
    for share in np.linspace(0.0, 1.0, 6):
        y = bottom - share * (bottom - top)
        canvas.line([(right, y), (right + 3, y)], AXIS)
        canvas.text((right + 5, y), f"{share:.1f}", 10, "lm")
    canvas.vertical_text((right + 34, (top + bottom) / 2), "share of the true class", 11, "lm")


def predicted_vs_true(true: np.ndarray, predicted: np.ndarray, title: str) -> bytes:
    """Each (sample, output) as a point, predicted against true, a colour per output (named in the
    legend up to 10 outputs); the diagonal is a perfect prediction."""
    true, predicted = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    true, predicted = true.reshape(len(true), -1), predicted.reshape(len(predicted), -1)
    finite = np.isfinite(true) & np.isfinite(predicted)
    canvas = Canvas((600, 550))
    top = canvas.title(title) + 10
    both = [*true[finite], *predicted[finite]]
    low, high = (min(both), max(both)) if both else (0.0, 1.0)
    panel = Panel(canvas, (75, top, 585, 550 - 45), [low, high], [low, high])
    panel.axes("true value", "predicted value")
    entries = []
    for j in range(true.shape[1]):
        colour = TAB10[j % len(TAB10)]
        panel.scatter(list(zip(true[finite[:, j], j], predicted[finite[:, j], j])), colour)
        if true.shape[1] <= 10:
            entries.append((f"output {j}", colour, "dot"))
    if both:
        panel.plot([(low, low), (high, high)], "#000000", markers=False, width=1.0)
        entries.append(("predicted = true", "#000000", "line"))
        panel.legend(entries)
    return canvas.png()


def run_curves(folder: RunDir, summary: dict[str, Any]) -> Path | None:
    """plots/learning_curves.png of a run (see `learning_curves`), if it has metrics; titled with the
    folder's name and the run's overrides."""
    records = read_metrics(folder)
    return write_bytes(folder.plots / "learning_curves.png", learning_curves(records, *marked(folder, summary))) \
        if records else None


def marked(folder: RunDir, summary: dict[str, Any]) -> tuple[int | None, str]:
    """A run's best epoch and the title of its curves: the folder's name and the run's overrides."""
    return summary.get("best", {}).get("epoch"), f"{folder.path.name}: {' '.join(summary.get('overrides', [])) or 'defaults'}"
