"""Pictures of pictures: grids of images with row and column labels, and film strips.

The shared sampler (`tune.sampling`) writes its grids and trajectory strips with these; the demo
draws its base-vs-tuned comparison with `make_grid`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont


def make_film_strip(frames: Sequence[Image.Image]) -> Image.Image:
    """Frames side by side, left to right, on one row."""
    return make_grid(frames, 1, len(frames))


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `max_width` pixels; at most `max_lines` lines, the last cut with '...'."""

    def width(s: str) -> float:
        return draw.textlength(s, font=font)

    lines: list[str] = []
    for word in text.split():
        pieces = []
        while width(word) > max_width and len(word) > 1:  # a word longer than a line: split it
            cut = 1
            while cut < len(word) - 1 and width(word[: cut + 1]) <= max_width:
                cut += 1
            pieces.append(word[:cut])
            word = word[cut:]
        pieces.append(word)
        for piece in pieces:
            if lines and width(f"{lines[-1]} {piece}") <= max_width:
                lines[-1] = f"{lines[-1]} {piece}"
            else:
                lines.append(piece)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and width(last + "...") > max_width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def make_grid(
    images: Sequence[Image.Image],
    rows: int,
    cols: int,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Images in row-major order on a white RGB canvas, cells sized to the largest image.

    Optional labels use PIL's default font: row labels in a left margin (wrapped, cut to the cell
    height), column labels above each column.
    """
    if rows < 1 or cols < 1 or len(images) != rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {rows * cols} images; got {len(images)}")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"need {rows} row labels; got {len(row_labels)}")
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"need {cols} column labels; got {len(col_labels)}")
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=font)
    line_h = int(bottom - top) + 3
    pad = 4

    row_lines: list[list[str]] = []
    margin_left = 0
    if row_labels is not None:
        # Wide enough for short labels, capped so long prompts wrap instead of dwarfing the images.
        limit = max(cell_w, 160)
        longest = max(draw.textlength(label, font=font) for label in row_labels)
        text_w = int(min(longest, limit)) + 1
        max_lines = max(1, (cell_h - pad) // line_h)
        row_lines = [fit_text(draw, label, font, text_w, max_lines) for label in row_labels]
        margin_left = text_w + 2 * pad
    col_lines: list[list[str]] = []
    margin_top = 0
    if col_labels is not None:
        col_lines = [fit_text(draw, label, font, max(cell_w - 2, 1), 2) for label in col_labels]
        margin_top = max(len(lines) for lines in col_lines) * line_h + 2 * pad

    canvas = Image.new("RGB", (margin_left + cols * cell_w, margin_top + rows * cell_h), "white")
    for index, image in enumerate(images):
        r, c = divmod(index, cols)
        canvas.paste(image.convert("RGB"), (margin_left + c * cell_w, margin_top + r * cell_h))
    draw = ImageDraw.Draw(canvas)
    for r, lines in enumerate(row_lines):
        for k, line in enumerate(lines):
            draw.text((pad, margin_top + r * cell_h + pad + k * line_h), line, fill="black", font=font)
    for c, lines in enumerate(col_lines):
        for k, line in enumerate(lines):
            draw.text((margin_left + c * cell_w + 1, pad + k * line_h), line, fill="black", font=font)
    return canvas
