"""Chosen classes and the labelled sample figure of generate.py (--class-labels, --class-names, --grid).

With --class-labels L_0,...,L_{K-1}, image i has class L[i mod K]; its noise still comes from (global_seed, i)
alone (reg/seeded_images.py), so image i is the same whatever the other labels are, and the npz labels are L[i mod K].
The grid then has one row per listed class (in the listed order, repeats merged) holding the first --grid
images of that class, with the class index (and its name from --class-names) written left of the row,
as in the paper's sample figures.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reg.utils import UserError


def parse_class_labels(text: str, num_classes: int | None = None) -> list[int]:
    """'1,207,360' or '@FILE' (one label per line; blank lines and '#' comments skipped) -> [1, 207, 360]."""
    flag = "--class-labels"
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise UserError(f"{flag}: cannot read {path} ({e})") from e
        items, where = [ln.split("#")[0].strip() for ln in lines], f"{flag} file {path}"
    else:
        items, where = text.split(","), flag
    items = [s.strip() for s in items if s.strip()]
    try:
        labels = [int(s) for s in items]
    except ValueError as e:
        raise UserError(f"{where}: expected integer class indices, got {items[:5]} ({e})") from e
    if not labels:
        raise UserError(f"{where}: no class index given")
    bad = [y for y in labels if y < 0 or (num_classes is not None and y >= num_classes)]
    if bad:
        raise UserError(f"{where}: class indices must be in [0, {num_classes}), got {bad[:5]}")
    return labels


def read_class_names(path: str | Path) -> list[str]:
    """One name per line, line k naming class k (e.g. ImageNet's synset descriptions)."""
    try:
        return [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as e:
        raise UserError(f"--class-names: cannot read {path} ({e})") from e


def grid_rows(labels: list[int], num_images: int, per_row: int) -> dict[int, list[int]]:
    """Class -> the first `per_row` image indices of that class, for image i of class labels[i % K]."""
    rows: dict[int, list[int]] = {y: [] for y in labels}
    for i in range(num_images):
        row = rows[labels[i % len(labels)]]
        if len(row) < per_row:
            row.append(i)
    return rows


def row_label(y: int, names: list[str] | None) -> str:
    if names and y < len(names) and names[y]:
        return f"{y}: {names[y]}"
    return str(y)


def labelled_grid(rows: list[tuple[str, list[np.ndarray]]]) -> Image.Image:
    """A figure with one row of uint8 (H, W, 3) images per (label, images), the label on the left, white."""
    side = next(im for _, ims in rows for im in ims).shape[0]
    columns = max(len(ims) for _, ims in rows)
    font = ImageFont.load_default(size=max(10, side // 8))
    pad = max(4, side // 16)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(measure.textlength(text, font=font) for text, _ in rows)
    left = int(text_w) + 2 * pad
    figure = Image.new("RGB", (left + columns * side, len(rows) * side), "white")
    draw = ImageDraw.Draw(figure)
    for r, (text, images) in enumerate(rows):
        draw.text((pad, r * side + side // 2), text, fill="black", font=font, anchor="lm")
        for c, image in enumerate(images):
            figure.paste(Image.fromarray(image), (left + c * side, r * side))
    return figure
