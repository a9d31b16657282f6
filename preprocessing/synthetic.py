"""A small procedurally generated labelled dataset, for tests and the offline quick start.

Each image is one big bold shape on a plain dark background. Class k is (shape k mod 8,
colour k mod 7); 8 and 7 are coprime, so the first 56 classes are distinct (shape, colour) pairs
and, for up to 7 classes, every class differs from every other in both shape and colour. Position,
size, rotation and colour shade are jittered slightly. The output is convert's layout (PNG
folder + dataset.json), so `dataset_tools.py encode` runs on it as on real data:

    python -m preprocessing.synthetic --dest DATA/imagenet_64_vae --num-images 512 --resolution 64 --num-classes 8
    python preprocessing/dataset_tools.py encode --source DATA/imagenet_64_vae --dest DATA/vae-sd --model-url pixel-unshuffle
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file: hand over to the module form with the repository root importable (as dataset_tools.py).
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p))
    os.execve(sys.executable, [sys.executable, "-m", "preprocessing.synthetic", *sys.argv[1:]], _env)

import argparse
import io
import json
import math

import PIL.Image
import PIL.ImageDraw
import numpy as np

from reg.utils import HelpFormatter

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "crescent")
COLOURS = {
    "red": (225, 45, 45), "green": (50, 190, 70), "blue": (60, 110, 240), "yellow": (240, 215, 50),
    "magenta": (215, 60, 205), "cyan": (50, 205, 215), "orange": (245, 140, 35),
}
MAX_CLASSES = len(SHAPES) * len(COLOURS)  # lcm(8, 7) = 56
SUPERSAMPLE = 4  # draw at 4x and BOX-downsample: anti-aliased edges


def class_name(k: int) -> str:
    return f"{list(COLOURS)[k % len(COLOURS)]} {SHAPES[k % len(SHAPES)]}"


def _polygon(cx: float, cy: float, r: float, angles_deg, radii, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * q * math.cos(math.radians(a + rot)), cy + r * q * math.sin(math.radians(a + rot)))
            for a, q in zip(angles_deg, radii)]


def draw_shape(draw: PIL.ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float,
               colour: tuple[int, int, int], background: tuple[int, int, int]) -> None:
    """One filled shape of 'radius' r centred at (cx, cy), rotated by rot degrees where visible."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, fill=colour)
        q = 0.55 * r
        draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=background)
    elif shape == "crescent":
        draw.ellipse(box, fill=colour)
        dx, dy = 0.45 * r * math.cos(math.radians(rot - 45)), 0.45 * r * math.sin(math.radians(rot - 45))
        q = 0.85 * r
        draw.ellipse((cx + dx - q, cy + dy - q, cx + dx + q, cy + dy + q), fill=background)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, (45, 135, 225, 315), [1] * 4, rot), fill=colour)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.1, (0, 90, 180, 270), (1, 0.75, 1, 0.75), rot), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, r * 1.1, (-90, 30, 150), [1] * 3, rot), fill=colour)
    elif shape == "star":
        angles = [-90 + 36 * i for i in range(10)]
        draw.polygon(_polygon(cx, cy, r * 1.1, angles, [1, 0.45] * 5, rot), fill=colour)
    elif shape == "cross":
        w, a = 0.36 * r, r  # arm half-width, arm length
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
        c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(label: int, resolution: int, rng: np.random.Generator) -> PIL.Image.Image:
    """One R x R RGB image of class `label`, with slight random jitter."""
    size = resolution * SUPERSAMPLE
    bg = tuple(int(v) for v in np.clip(30 + rng.integers(-8, 9, 3), 0, 255))
    base = np.array(COLOURS[list(COLOURS)[label % len(COLOURS)]], dtype=np.float64)
    colour = tuple(int(v) for v in np.clip(base * rng.uniform(0.85, 1.1) + rng.integers(-12, 13, 3), 0, 255))
    r = size * rng.uniform(0.27, 0.35)
    cx, cy = size * (0.5 + rng.uniform(-0.08, 0.08, 2))
    rot = rng.uniform(-10, 10)
    img = PIL.Image.new("RGB", (size, size), bg)
    draw_shape(PIL.ImageDraw.Draw(img), SHAPES[label % len(SHAPES)], cx, cy, r, rot, colour, bg)
    return img.resize((resolution, resolution), resample=PIL.Image.Resampling.BOX)


def write_dataset(dest: str, *, num_images: int, resolution: int = 64, num_classes: int = 8, seed: int = 0) -> int:
    """Write num_images PNGs (00000/img00000000.png ...) and dataset.json to dest; return the count."""
    from preprocessing import image_name  # the same naming as convert
    from reg.utils import atomic_write_bytes

    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")
    if resolution < 8 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    if os.path.isdir(dest) and os.listdir(dest):
        raise FileExistsError(f"--dest folder {dest} is not empty")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_images) % num_classes)  # balanced classes, shuffled order
    entries = []
    for i, label in enumerate(labels.tolist()):
        buf = io.BytesIO()
        render(label, resolution, rng).save(buf, format="png", compress_level=0)
        atomic_write_bytes(os.path.join(dest, image_name(i)), buf.getvalue())
        entries.append([image_name(i), label])
    meta = {"labels": entries, "class_names": [class_name(k) for k in range(num_classes)]}
    atomic_write_bytes(os.path.join(dest, "dataset.json"), json.dumps(meta, allow_nan=False).encode())
    return num_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dest", required=True, metavar="DIR", help="output folder (empty or new)")
    p.add_argument("--num-images", type=int, default=512, metavar="INT", help="how many images")
    p.add_argument("--resolution", type=int, default=64, metavar="INT", help="image side, a multiple of 8")
    p.add_argument("--num-classes", type=int, default=8, metavar="INT", help=f"classes, at most {MAX_CLASSES}")
    p.add_argument("--seed", type=int, default=0, metavar="INT", help="random seed")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    n = write_dataset(args.dest, num_images=args.num_images, resolution=args.resolution,
                      num_classes=args.num_classes, seed=args.seed)
    print(f"synthetic: wrote {n} images ({args.resolution}x{args.resolution}, {args.num_classes} classes) to {args.dest}")
    return n


if __name__ == "__main__":
    main(parse_args())
