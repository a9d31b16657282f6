"""The training dataset: uint8 images paired with pre-computed SD-VAE posterior moments.

On-disk layout (what REPA/REG users already have; read as is; docs/design.md#data-layout):

    DATA/imagenet_{R}_vae/00000/img00000000.png ...           uint8 RGB, R x R
    DATA/vae-sd/00000/img-mean-std-00000000.npy ...           float32 (2C, R/8, R/8) = mean || std
    DATA/vae-sd/dataset.json   {"labels": [["00000/img-mean-std-00000000.npy", cls], ...],
                                "vae": {"name", "latent_channels", "scaling_factor", "resolution"}}

The image folder may also be REG's `imagenet_256_vae` at any resolution (REG dataset.py reads that
name even at 512 px) or REPA's `images`; `CustomDataset.layout` says which one was found.
Either folder may instead be a zip holding the same relative paths
(DATA/imagenet_{R}_vae.zip, DATA/vae-sd.zip); zips move better on cluster file systems.
Images and latents pair up by the index in their names (img00000005.png <-> img-mean-std-00000005.npy);
a file without a partner is an error. The optional "vae" entry is written by our
`preprocessing/dataset_tools.py encode`; without it (official data) the SD-VAE defaults hold:
4 latent channels, scaling factor 0.18215.

The listing (pairs, labels, where each zip member lies) is kept in an index file beside the data
(reg/data_index.py, docs/data.md#the-index), built once and memory-mapped by every process;
reg/data_check.py compares the data with what encode recorded (docs/data.md#the-data-check).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Sequence

import PIL.Image
import numpy as np
import torch
from torch.utils.data import Dataset

from models.vae import SD_VAE_SCALING_FACTOR, VAE_STRIDE
from preprocessing.records import ENCODE_CONFIG, RECORD_KEYS, record_arrays
from reg import data_index
from reg.utils import DEBUG_ENV, UserError

log = logging.getLogger(__name__)

SD_VAE_INFO = {"name": None, "latent_channels": 4, "scaling_factor": SD_VAE_SCALING_FACTOR}
LATENT_DIR = "vae-sd"
REPA_IMAGE_DIR = "images"
_IMAGE_INDEX = re.compile(r"img(\d+)\.[^./]+")  # convert's naming: 00000/img00000005.png
_LATENT_INDEX = re.compile(r"img-mean-std-(\d+)\.npy")  # encode's naming: 00000/img-mean-std-00000005.npy


def image_dir_name(resolution: int) -> str:
    return f"imagenet_{resolution}_vae"


def _exists(data_dir: str, base: str) -> bool:
    return os.path.isdir(os.path.join(data_dir, base)) or os.path.isfile(os.path.join(data_dir, base + ".zip"))


def find_image_dir(data_dir: str, resolution: int) -> tuple[str, str]:
    """(folder name, layout description) of the image folder under DATA.

    imagenet_{R}_vae (ours, and REG's at 256 px) first; else REG's imagenet_256_vae (REG dataset.py
    reads that name at every resolution) or REPA's images/. Two candidates of the second kind are
    ambiguous: refuse rather than pick one.
    """
    own = image_dir_name(resolution)
    if _exists(data_dir, own):
        return own, f"REG layout: {own} + {LATENT_DIR}"
    others = [(image_dir_name(256), f"REG layout (REG's folder name at {resolution} px): "
                                    f"{image_dir_name(256)} + {LATENT_DIR}")] if resolution != 256 else []
    others.append((REPA_IMAGE_DIR, f"REPA layout: {REPA_IMAGE_DIR} + {LATENT_DIR}"))
    found = [c for c in others if _exists(data_dir, c[0])]
    if len(found) > 1:
        raise UserError(f"{data_dir} holds both {found[0][0]} and {found[1][0]} but no {own}: "
                         f"it is unclear which holds the {resolution}x{resolution} images; rename or move one")
    if found:
        return found[0]
    names = " or ".join([own] + [c[0] for c in others])
    raise FileNotFoundError(f"missing data: no image folder (or .zip) {names} in {data_dir}")


def is_image_name(name: str) -> bool:
    PIL.Image.init()  # registers all formats once; a no-op afterwards
    return os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION


class FileTree:
    """Read-only access to a folder or a zip by '/'-separated relative names.

    A zip's member list is read on first use (an indexed dataset never reads it); its handle is opened
    lazily and re-opened in each process (DataLoader workers fork: a ZipFile shared across processes
    would interleave seeks on one file descriptor). Two members of one name are refused: which one is
    meant is unknown (zipfile would hand out the last one for both).
    """

    def __init__(self, path: str):
        self.path = str(path)
        self.is_zip = os.path.isfile(self.path) and self.path.lower().endswith(".zip")
        if not self.is_zip and not os.path.isdir(self.path):
            raise FileNotFoundError(f"no such folder or .zip: {self.path}")
        self._prefix: str | None = None
        self._names: list[str] | None = None
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        # A folder's directories below its root and their stat, as the last full list() met them (each stat
        # taken before the directory was read): the index's fingerprint of the folder (reg/data_index.py).
        self.dir_stats: list[tuple[str, os.stat_result]] = []

    def __repr__(self) -> str:
        return f"FileTree({self.path!r})"

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path, mode="r")
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self):  # spawn-style workers pickle the dataset: never pickle an open handle
        state = self.__dict__.copy()
        state["_zip"], state["_zip_pid"] = None, None
        return state

    def release(self) -> None:
        """Forget the member list and close the zip (with its entry per member): an index reads without them."""
        self.prefix  # noqa: B018  known before the list goes
        if self._zip is not None:
            self._zip.close()
        self._zip, self._zip_pid, self._names, self.dir_stats = None, None, None, []

    @property
    def prefix(self) -> str:
        """The folder every member of a zip sits in (`zip -r vae-sd.zip vae-sd` puts all under "vae-sd/"), or ""."""
        if self.is_zip and self._prefix is None:
            self._read_members()
        return self._prefix or ""

    def _read_members(self) -> None:
        names = [n for n in self._zipfile().namelist() if not n.endswith("/")]
        if len(set(names)) != len(names):
            seen: set[str] = set()
            twice = next(n for n in names if n in seen or seen.add(n))
            raise UserError(f"{self.path} holds two members named {twice!r}: which one is meant is unknown; "
                            "rebuild the zip")
        stem = os.path.splitext(os.path.basename(self.path))[0] + "/"
        self._prefix = stem if names and all(n.startswith(stem) for n in names) else ""
        self._names = sorted(n[len(self._prefix):] for n in names)

    def list(self, under: str = "") -> list[str]:
        """All file names (in the folder `under`, if given), sorted, relative to the root, '/'-separated."""
        if self.is_zip:
            if self._names is None:
                self._read_members()
            return [n for n in self._names if n.startswith(under + "/")] if under else list(self._names)
        names, stats = [], []
        start = os.path.join(self.path, under)
        if under and not os.path.isdir(start):
            return []
        # Symlinked folders are followed (a class folder b -> elsewhere/ is a class like any other; not
        # following it would drop class b and shift every later label), refusing a link into its own ancestry.
        for root, dirs, files in os.walk(start, followlinks=True):
            rel = os.path.relpath(root, self.path)
            real = os.path.realpath(root)
            for d in dirs:
                target = os.path.realpath(os.path.join(root, d))
                if real == target or real.startswith(target.rstrip(os.sep) + os.sep):
                    raise UserError(f"{os.path.join(root, d)} is a symbolic link to {target}, a folder that "
                                    f"contains it: the listing of {self.path} would never end; remove the link")
                # before os.walk reads it: a change after this stat shows in the folder's fingerprint
                stats.append((os.path.join(rel, d).replace(os.sep, "/") if rel != "." else d,
                              os.stat(os.path.join(root, d))))
            for f in files:
                names.append(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/"))
        if not under:
            self.dir_stats = stats
        return sorted(names)

    def exists(self, name: str) -> bool:
        if self.is_zip:
            try:
                self._zipfile().getinfo(self.prefix + name)
                return True
            except KeyError:
                return False
        return os.path.isfile(os.path.join(self.path, name))

    def size(self, name: str) -> int:
        """A file's size in bytes (uncompressed size inside a zip)."""
        if self.is_zip:
            return self._zipfile().getinfo(self.prefix + name).file_size
        return os.path.getsize(os.path.join(self.path, name))

    def infos(self, names: Sequence[str]) -> list[zipfile.ZipInfo]:
        """The zip entries of these members (a zip's only)."""
        z, prefix = self._zipfile(), self.prefix
        return [z.getinfo(prefix + n) for n in names]

    def open(self, name: str):
        """A binary file object (use as a context manager)."""
        if self.is_zip:
            return self._zipfile().open(self.prefix + name, "r")
        return open(os.path.join(self.path, name), "rb")

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def describe(self, name: str) -> str:
        """Where a file lives, for error messages."""
        return f"{self.path}:{self.prefix}{name}" if self.is_zip else os.path.join(self.path, name)


def open_tree(data_dir: str, base: str) -> FileTree:
    """DATA/base/ or DATA/base.zip, with a clear error when neither exists."""
    folder, archive = os.path.join(data_dir, base), os.path.join(data_dir, base + ".zip")
    if os.path.isdir(folder):
        return FileTree(folder)
    if os.path.isfile(archive):
        return FileTree(archive)
    raise FileNotFoundError(f"missing data: neither the folder {folder} nor the archive {archive} exists")


def read_dataset_json(tree: FileTree) -> dict:
    if not tree.exists("dataset.json"):
        raise FileNotFoundError(f"missing {tree.describe('dataset.json')}")
    try:
        meta = json.loads(tree.read("dataset.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{tree.describe('dataset.json')} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise UserError(f"{tree.describe('dataset.json')} holds a {type(meta).__name__}, not an object")
    return meta


def parse_labels(meta: dict, where: str) -> dict[str, int] | None:
    """dataset.json's "labels" as {name: int class}; None when the dataset is unlabelled ("labels": null).

    Classes must be JSON integers: 3.0 or "3" is refused (naming the entry), since a float label
    usually means the file was written by something else (regression targets, soft labels).
    """
    labels = meta.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, list):
        raise UserError(f"{where}: \"labels\" must be a list of [name, class] pairs or null")
    out: dict[str, int] = {}
    for entry in labels:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise UserError(f"{where}: label entry {entry!r} is not a [name, class] pair")
        name, cls = entry
        if isinstance(cls, bool) or not isinstance(cls, int):
            raise UserError(f"{where}: the label of {name!r} is {cls!r}, not an integer class")
        if not -2**63 <= cls < 2**63:  # JSON integers have no bound; a class table has
            raise UserError(f"{where}: the label of {name!r} is {cls}, outside any class range")
        name = name.replace("\\", "/")
        if name in out:
            raise UserError(f"{where}: {name!r} is listed twice")
        out[name] = cls
    return out


def vae_description(meta: dict, where: str, resolution: int) -> dict:
    """dataset.json's "vae" entry over the SD-VAE defaults, its values checked; it must be for `resolution`."""
    entry = meta.get("vae") or {}
    if not isinstance(entry, dict):
        raise UserError(f"{where}: \"vae\" must be an object, got {entry!r}")
    info = {**SD_VAE_INFO, "resolution": resolution, **entry}
    for key in ("latent_channels", "resolution"):
        if isinstance(info[key], bool) or not isinstance(info[key], int) or info[key] <= 0:
            raise UserError(f"{where}: \"vae\": {key} is {info[key]!r}, not a positive integer")
    scale = info["scaling_factor"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise UserError(f"{where}: \"vae\": scaling_factor is {scale!r}, not a positive number")
    if info["name"] is not None and not isinstance(info["name"], str):
        raise UserError(f"{where}: \"vae\": name is {info['name']!r}, not a string")
    if info["resolution"] != resolution:
        raise UserError(f"{where} says the latents are for resolution {info['resolution']}, but "
                        f"resolution={resolution} was asked for")
    return info


def read_npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy stream, reading only its header."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


# PIL modes and how to_rgb makes 8-bit RGB of them (docs/data.md#image-modes).
PIL_RGB_MODES = ("RGB", "RGBX", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV")  # PIL's convert("RGB"), as REG/REPA/ADM
ALPHA_MODES = ("RGBA", "LA", "PA")  # alpha dropped, the stored colour kept: convert("RGB"), as REG/REPA/ADM
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 0..65535 -> the high byte, as PIL reads 16-bit RGB


class UnreadableSample(UserError, RuntimeError):
    """A file of the data that cannot be read, or is not what the data promises; the message names it.

    A DataLoader worker's error reaches the main process as its type built from the worker's whole
    traceback text; this type keeps only its own last message, so that the entry points print one line
    (REG_DEBUG=1 keeps everything). Also a RuntimeError, as these errors were before."""

    def __init__(self, message: str = ""):
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message and os.environ.get(DEBUG_ENV, "") in ("", "0"):
            message = message[message.rindex(marker) + len(marker):].strip()
        super().__init__(message)


class UnsupportedImageMode(UnreadableSample):
    """An image whose pixel format has no unambiguous 8-bit RGB meaning (float, 32-bit, premultiplied)."""


def to_rgb(img: PIL.Image.Image, where: str) -> PIL.Image.Image:
    """The one conversion of a decoded image to 8-bit RGB, shared by convert, encode and the training dataset.

    PIL's convert("RGB") (what REG, REPA and ADM call) clips 16-bit and 32-bit values to 255 instead of
    scaling them, so a 16-bit PNG comes out nearly white. Here 16-bit grey (I;16*, and I holding 0..65535,
    as older Pillow opened 16-bit PNGs) keeps its high byte, as PIL itself does when it reads a 16-bit RGB
    PNG. Alpha is dropped and the stored colour kept (what convert("RGB") does, so the same pixels as the
    authors' data); a palette's transparent entry keeps its palette colour. Modes without one meaning (F,
    I outside 0..65535, premultiplied alpha, ...) are refused, naming `where` and the mode. Always returns a
    new, fully decoded image (as convert does), usable after the file is closed.
    """
    if img.mode in PIL_RGB_MODES or img.mode in ALPHA_MODES:
        if img.mode == "P" and "transparency" in img.info:
            img = img.copy()  # PIL warns about bytes transparency; the rule above is deliberate
            del img.info["transparency"]
        return img.convert("RGB")
    if img.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(img)  # (H, W) uint16 (any byte order), or int32 for I
        if img.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            raise UnsupportedImageMode(f"{where}: mode I (32-bit integer) with values in [{a.min()}, {a.max()}], "
                                       "not 16-bit (0..65535): its 8-bit meaning is unknown; convert it to 8-bit "
                                       "RGB first")
        return PIL.Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), "L").convert("RGB")
    raise UnsupportedImageMode(f"{where}: image mode {img.mode} is not supported (its 8-bit RGB meaning is "
                               f"ambiguous; supported: {', '.join(PIL_RGB_MODES + ALPHA_MODES + SIXTEEN_BIT_MODES)}); "
                               "convert it to 8-bit RGB first")


def decode_image(data: bytes, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (H, W, 3) through to_rgb (16-bit scaled, alpha dropped, float refused);
    errors name the file."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            return np.asarray(to_rgb(img, where))
    except UnsupportedImageMode:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise UnreadableSample(f"corrupt or unreadable image {where}: {e}") from e


def _pair_key(name: str, pattern: re.Pattern, tree: FileTree, what: str) -> int:
    m = pattern.fullmatch(name.rsplit("/", 1)[-1])
    if m is None:
        raise UserError(f"{tree.describe(name)} does not follow the {what} naming "
                         f"({'00000/img00000005.png' if what == 'image' else '00000/img-mean-std-00000005.npy'}), "
                         "so it cannot be paired; write the data with preprocessing/dataset_tools.py convert/encode")
    return int(m.group(1))


def _index_names(names: list[str], pattern: re.Pattern, tree: FileTree, what: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for n in names:
        k = _pair_key(n, pattern, tree, what)
        if k in out:
            raise UserError(f"two {what} files have the index {k}: {tree.describe(out[k])} and {tree.describe(n)}")
        out[k] = n
    return out


def pair_files(images: FileTree, latents: FileTree) -> tuple[list[str], list[str]]:
    """The image and latent names, paired by the index in the names (REG/REPA pair by sorted position,
    which silently shifts every later pair when one file is missing), in the latents' sorted order."""
    image_names = [n for n in images.list() if is_image_name(n)]
    latent_names = [n for n in latents.list() if n.endswith(".npy")]
    if not latent_names and not image_names:
        raise UserError(f"no images/latents found in {images.path} and {latents.path}")
    by_image = _index_names(image_names, _IMAGE_INDEX, images, "image")
    by_latent = _index_names(latent_names, _LATENT_INDEX, latents, "latent")
    lonely_latents = sorted(set(by_latent) - set(by_image))
    lonely_images = sorted(set(by_image) - set(by_latent))
    if lonely_latents or lonely_images:
        parts = []
        if lonely_latents:
            parts.append(f"{len(lonely_latents)} latent file(s) without an image, e.g. "
                         f"{latents.describe(by_latent[lonely_latents[0]])}")
        if lonely_images:
            parts.append(f"{len(lonely_images)} image(s) without a latent file, e.g. "
                         f"{images.describe(by_image[lonely_images[0]])}")
        raise UserError(f"images and latents do not pair up ({len(image_names)} images in {images.path}, "
                        f"{len(latent_names)} .npy files in {latents.path}): " + "; ".join(parts))
    keys = sorted(by_latent, key=lambda k: by_latent[k])  # the latents' sorted order, as REG's
    return [by_image[k] for k in keys], [by_latent[k] for k in keys]


def label_array(labels: dict[str, int] | None, latent_names: list[str], json_where: str,
                latents: FileTree) -> np.ndarray | None:
    """The labels of latent_names (int64), from dataset.json's; one per file, none for a file that is not
    there. None for an unlabelled dataset."""
    if labels is None:
        return None
    missing = [n for n in latent_names if n not in labels]
    if missing:
        raise UserError(f"{len(missing)} latent file(s) have no label in {json_where}, e.g. {missing[0]}")
    if len(labels) != len(latent_names):
        extra = sorted(set(labels) - set(latent_names))
        raise UserError(f"{json_where} labels {len(extra)} file(s) that are not in {latents.path}, "
                        f"e.g. {extra[0]} (an incomplete copy?)")
    return np.array([labels[n] for n in latent_names], dtype=np.int64)


# ----------------------------------------------------------------------------- the listing and its index

SIDES = ("image", "latent")
INDEX_KEYS = ("items", "labels", "image_names", "image_name_offsets", "latent_names", "latent_name_offsets")
# One row per item in the index, read with one positioned read: its label and, for a zip, where each of its two
# files lies (offset -1 for a folder's file, read by name) and what to check its bytes against.
ITEM = np.dtype([("label", "<i8")] + [(f"{side}_{f}", t) for side in SIDES for f, t in (
    ("offset", "<i8"), ("stored", "<i8"), ("size", "<i8"), ("crc", "<u4"), ("method", "u1"))])


@dataclass
class Listing:
    """What start-up learns about a data folder: the two trees, the pairs (in the latents' sorted order),
    the labels, dataset.json's "vae" entry and, from an index, where each zip member lies.

    Listed without an index (`list_plain`, the reader as it always was) the names are Python lists and
    the labels an array; from an index (`tables`, reg/data_index.py) the names are NameTables and each
    item's row is read when the item is."""
    images: FileTree
    latents: FileTree
    layout: str
    image_names: Sequence[str]
    latent_names: Sequence[str]
    labelled: bool
    vae_entry: dict | None
    labels: np.ndarray | None = None  # int64 (N,), zeros when unlabelled; None when in `tables`
    tables: data_index.Tables | None = None
    index_path: str | None = None
    fingerprint: dict | None = None
    _arrays: dict | None = None  # file sizes and the encode record of a listing without an index

    def __len__(self) -> int:
        return len(self.latent_names)

    def names(self, side: str) -> Sequence[str]:
        return self.image_names if side == "image" else self.latent_names

    def tree(self, side: str) -> FileTree:
        return self.images if side == "image" else self.latents

    def label_array(self) -> np.ndarray:
        """Every label (from an index: memory-mapped; drop it after use)."""
        return self.labels if self.tables is None else self.tables.array("labels")

    def row(self, i: int) -> np.void | None:
        """Item i's row of the index (ITEM), or None without one."""
        return None if self.tables is None else self.tables.rows("items", i, i + 1)[0]

    def stored_arrays(self) -> dict[str, np.ndarray]:
        """File sizes (`image_size`, `latent_size`) and the encode record (RECORD_KEYS, when there is one):
        from the index (memory-mapped: drop them after use), else computed now."""
        if self.tables is None:
            if self._arrays is None:
                self._arrays = {**file_sizes(self),
                                **record_arrays(self.latents, self.latent_names, self.image_names)}
            return self._arrays
        items = self.tables.array("items")
        return {**{f"{side}_size": items[f"{side}_size"] for side in SIDES},
                **{key: self.tables.array(key) for key in RECORD_KEYS if key in self.tables}}

    def use_index(self, tables: data_index.Tables, path: str | None, fingerprint: dict) -> None:
        """Read from now on through the index's arrays (no Python object per entry)."""
        self.tables, self.index_path, self.fingerprint, self.labels = tables, path, fingerprint, None
        self.image_names = data_index.NameTable(tables, "image")
        self.latent_names = data_index.NameTable(tables, "latent")
        self.images.release()
        self.latents.release()


def list_plain(data_dir: str, resolution: int, latents: FileTree) -> Listing:
    """The listing read from the trees themselves, every start-up check of the data in its order; the
    index is built from it."""
    meta = read_dataset_json(latents)
    json_where = latents.describe("dataset.json")
    vae_description(meta, json_where, resolution)  # first: a resolution mismatch explains a missing image folder
    image_base, layout = find_image_dir(data_dir, resolution)
    images = open_tree(data_dir, image_base)
    image_names, latent_names = pair_files(images, latents)
    labels = label_array(parse_labels(meta, json_where), latent_names, json_where, latents)
    return Listing(images, latents, layout, image_names, latent_names, labels is not None, meta.get("vae"),
                   labels if labels is not None else np.zeros(len(latent_names), np.int64))


def file_sizes(listing: Listing) -> dict[str, np.ndarray]:
    """Every file's size in bytes (a zip member's uncompressed size), read now."""
    return {f"{side}_size": np.fromiter((listing.tree(side).size(n) for n in listing.names(side)), np.int64,
                                        len(listing.names(side))) for side in SIDES}


class _NotIndexable(Exception):
    pass


def _index_arrays(listing: Listing) -> dict[str, np.ndarray]:
    """The arrays of an index file: the items' rows (ITEM), the labels alone, the names, the encode record."""
    items = np.zeros(len(listing), ITEM)
    items["label"] = listing.labels
    arrays = {"items": items, "labels": listing.labels,
              **record_arrays(listing.latents, listing.latent_names, listing.image_names)}
    for side in SIDES:
        tree, names = listing.tree(side), listing.names(side)
        arrays[f"{side}_names"], arrays[f"{side}_name_offsets"] = data_index.pack_names(names)
        items[f"{side}_offset"] = -1
        if not tree.is_zip:
            items[f"{side}_size"] = [os.path.getsize(os.path.join(tree.path, n)) for n in names]
            continue
        infos = tree.infos(names)
        odd = next((i for i in infos if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
                    or i.flag_bits & 0x1), None)
        if odd is not None:
            raise _NotIndexable(f"{tree.path}:{odd.filename} is encrypted or compressed with method "
                                f"{odd.compress_type} (the index reads stored and deflated members)")
        items[f"{side}_offset"] = data_index.zip_data_offsets(tree.path, infos)
        for field, attr in (("stored", "compress_size"), ("size", "file_size"), ("crc", "CRC"),
                            ("method", "compress_type")):
            items[f"{side}_{field}"] = [getattr(i, attr) for i in infos]
    return arrays


def _file_digests(images: FileTree, latents: FileTree) -> dict:
    """The part of an index's fingerprint read from files (reg/data_index.py): each zip's directory digest, each
    folder's root entries, and the sha256 of a latent folder's label and encode-settings files."""
    fp = {key: data_index.zip_digest(tree.path) if tree.is_zip else data_index.entries_digest(tree.path)
          for key, tree in (("images", images), ("latents", latents))}
    if not latents.is_zip:
        fp.update({name: data_index.file_digest(os.path.join(latents.path, name))
                   for name in ("dataset.json", ENCODE_CONFIG)})
    return fp


def _folder_digests(images: FileTree, latents: FileTree, dirs: dict) -> dict:
    """The part of an index's fingerprint from the folders: their directories below the root (dirs[key]), stat now."""
    return {f"{key} folders": data_index.folder_digest(data_index.stat_folders(tree.path, dirs[key]))
            for key, tree in (("images", images), ("latents", latents)) if not tree.is_zip}


def open_listing(data_dir: str, resolution: int, *, use_index: bool = True,
                 report: Callable[[str], None] = log.info) -> Listing:
    """The listing of DATA for `resolution`: from its index when that is still the data's, else listed and
    indexed (once; the index is written beside the data, else in the cache folder); `use_index=False` lists
    without one, as the reader always did. Any problem of the data raises the same error either way."""
    latents = open_tree(data_dir, LATENT_DIR)
    if not use_index:
        return list_plain(data_dir, resolution, latents)
    try:
        image_base, _ = find_image_dir(data_dir, resolution)
        images = open_tree(data_dir, image_base)
        before = _file_digests(images, latents)
    except (UserError, OSError, zipfile.BadZipFile):
        return list_plain(data_dir, resolution, latents)  # raises the error of the data, as it always did
    places = data_index.locations(data_dir, image_base)
    reasons = []
    for path in places:
        if not path.is_file():
            continue
        try:
            t0 = time.perf_counter()
            meta, tables = data_index.load(path)
            missing = [key for key in INDEX_KEYS if key not in tables]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            if meta["fingerprint"] == {**before, **_folder_digests(images, latents, meta["dirs"])}:
                data_index.verify(path)  # its bytes too, once it is the data's
                images._prefix, latents._prefix = meta["prefixes"]
                listing = Listing(images, latents, meta["layout"], (), (), meta["labelled"], meta["vae_entry"])
                listing.use_index(tables, str(path), meta["fingerprint"])
                report(f"data index {path}: {len(listing)} items, checked and loaded in "
                       f"{time.perf_counter() - t0:.2f} s")
                return listing
            reasons.append(f"{path} is stale (the data changed since it was built)")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            reasons.append(f"{path} is unreadable ({type(e).__name__}: {e})")
    return _build_index(data_dir, resolution, latents, images.path, before, places, reasons, report)


def _build_index(data_dir: str, resolution: int, latents: FileTree, images_path: str, before: dict, places: list,
                 reasons: list[str], report: Callable[[str], None]) -> Listing:
    """List DATA (list_plain), then write its index to the first of `places` that takes it."""
    report("data index: " + "; ".join(reasons + [f"building it for {data_dir} (once; about a minute per million "
                                                 "items)"]))
    t0 = time.perf_counter()
    listing = list_plain(data_dir, resolution, latents)
    try:
        arrays = _index_arrays(listing)
    except _NotIndexable as e:
        report(f"data index: none ({e}); the data is listed at every start")
        return listing
    dirs = {key: [d for d, _ in tree.dir_stats] for key, tree in (("images", listing.images), ("latents", latents))}
    walked = {f"{key} folders": data_index.folder_digest(tree.dir_stats)
              for key, tree in (("images", listing.images), ("latents", latents)) if not tree.is_zip}
    fp = {**before, **walked}
    meta = {"fingerprint": fp, "dirs": dirs, "layout": listing.layout, "labelled": listing.labelled,
            "vae_entry": listing.vae_entry, "prefixes": [listing.images.prefix, latents.prefix]}
    now = {**_file_digests(listing.images, latents), **_folder_digests(listing.images, latents, dirs)}
    if now != fp or listing.images.path != images_path:  # changed while it was listed: trust none of it
        report("data index: the data changed while it was listed; no index written")
        return listing
    failures = []
    for path in places:
        try:
            data_index.save(path, meta, arrays)
        except OSError as e:
            failures.append(f"{path}: {e}")
            continue
        report(f"data index of {len(listing)} items built in {time.perf_counter() - t0:.1f} s, written to "
               f"{path}" + (f" (not beside the data: {failures[0]})" if failures else ""))
        listing.use_index(data_index.load(path)[1], str(path), fp)  # what every later start reads
        return listing
    report(f"data index: could not be written ({'; '.join(failures)}); kept in memory, rebuilt at every start")
    listing.use_index(data_index.Tables(arrays), None, fp)
    return listing


class _Files:
    """The bytes of one side ("image" or "latent") of each item: positioned reads at the index's offsets in a
    zip (os.pread on one descriptor per process), else through the tree (a folder's files by name, a zip
    through zipfile, as the reader always did)."""

    def __init__(self, listing: Listing, side: str):
        self.listing, self.side = listing, side
        tree = listing.tree(side)
        self.file = data_index.PinnedFile(tree.path) if tree.is_zip and listing.tables is not None else None

    def describe(self, i: int) -> str:
        return self.listing.tree(self.side).describe(self.listing.names(self.side)[i])

    def read(self, i: int, row: np.void | None = None) -> bytes:
        """Item i's file; `row`: its row of the index, when already read."""
        tree, side = self.listing.tree(self.side), self.side
        row = self.listing.row(i) if row is None and self.file is not None else row
        if self.file is None:
            return tree.read(self.listing.names(side)[i])
        return data_index.read_member(self.file, *(int(row[f"{side}_{f}"]) for f in
                                                   ("offset", "stored", "size", "crc", "method")))


# ----------------------------------------------------------------------------- the dataset

class CustomDataset(Dataset):
    """Training items: images paired with their VAE posterior moments and class labels.

    Items are `(image uint8 (3, R, R), moments float32 (2C, R/8, R/8), label int64 ())`. With
    `skip_bad_samples=True` they are 4-tuples `(image, moments, label, replaced bool ())`: an item
    whose image or latent cannot be read (or has the wrong shape) is logged once per file and
    replaced by the next index that reads fine (wrapping around), with `replaced=True` so that the
    trainer can count them. The replacement depends only on the files, never on timing or worker
    order, so a resumed run reads exactly the same batches. With `skip_bad_samples=False` (the
    default, and REG's behaviour) a bad item raises UnreadableSample naming the file.

    Images and latents are paired by the index in their names (img00000005.png <->
    img-mean-std-00000005.npy), never by position; a file without a partner is an error. Labels come
    from vae-sd/dataset.json and must be integers in [0, num_classes); an unlabelled dataset
    ("labels": null) is only accepted with num_classes == 1 (every label 0).

    Start-up is cheap: the index (open_listing; built once), dataset.json's "vae" entry, the labels'
    range, and the first image and latent file. Everything else is checked per item as it is read;
    reg/data_check.py compares the files with encode's record. `use_index=False` lists the folders at
    every start instead, as the reader always did; `report` receives the index's log lines.
    """

    def __init__(self, data_dir: str, *, resolution: int = 256, num_classes: int = 1000,
                 latent_channels: int | None = None, skip_bad_samples: bool = False, use_index: bool = True,
                 report: Callable[[str], None] = log.info):
        self.data_dir = str(data_dir)
        self.resolution = resolution
        self.num_classes = num_classes
        self.skip_bad_samples = skip_bad_samples
        self.vae_stride = VAE_STRIDE
        self._reported: set[str] = set()  # files already logged as bad (per process)
        if resolution % VAE_STRIDE:
            raise UserError(f"resolution {resolution} is not a multiple of the VAE stride {VAE_STRIDE}")
        self.listing = open_listing(self.data_dir, resolution, use_index=use_index, report=report)
        self.images, self.latents, self.layout = self.listing.images, self.listing.latents, self.listing.layout
        json_where = self.latents.describe("dataset.json")
        self.vae_info = vae_description({"vae": self.listing.vae_entry}, json_where, resolution)
        report(f"dataset: {self.layout} in {self.data_dir}")
        self._files = {side: _Files(self.listing, side) for side in SIDES}
        self._check_labels(json_where)
        self._check_first_files(latent_channels, json_where)

    @property
    def image_names(self) -> Sequence[str]:
        return self.listing.image_names

    @property
    def latent_names(self) -> Sequence[str]:
        return self.listing.latent_names

    @property
    def labels(self) -> np.ndarray:
        """Every item's label (from an index: memory-mapped; drop it after use)."""
        return self.listing.label_array()

    def _check_labels(self, json_where: str) -> None:
        if not self.listing.labelled and self.num_classes != 1:
            raise UserError(f"{json_where} has no labels (\"labels\": null: an unlabelled dataset); train it "
                            f"unconditionally with --num-classes 1, or re-encode from labelled images")
        labels = self.labels
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            i = int(bad[0])
            raise UserError(f"{bad.size} label(s) outside [0, {self.num_classes}), e.g. {self.latent_names[i]} "
                            f"has label {labels[i]} (set num_classes to match the data)")

    def _check_first_files(self, latent_channels: int | None, json_where: str) -> None:
        """The channel count (asked for, else from dataset.json) against the first latent file's header,
        and the first image's size: the cheap start-up checks; every other file is checked as it is read."""
        resolution = self.resolution
        info_channels = int(self.vae_info["latent_channels"])
        if latent_channels is not None and latent_channels != info_channels:
            raise UserError(f"latent_channels={latent_channels} was asked for, but "
                            f"{json_where} describes {info_channels}-channel latents")
        self._channels = info_channels
        side = resolution // VAE_STRIDE
        self.moments_shape = (2 * info_channels, side, side)
        first = self.latent_names[0]
        try:
            shape, dtype = read_npy_header(io.BytesIO(self._files["latent"].read(0)))
        except (OSError, ValueError) as e:
            raise UnreadableSample(f"corrupt latent file {self.latents.describe(first)}: {e}") from e
        self._check_moments_shape(tuple(shape), first)
        self._check_moments_dtype(dtype, first)
        where = self._files["image"].describe(0)
        try:
            size = PIL.Image.open(io.BytesIO(self._files["image"].read(0))).size
        except Exception as e:
            raise UnreadableSample(f"corrupt or unreadable image {where}: {e}") from e
        if size != (resolution, resolution):
            raise UserError(f"{where} is {size[0]}x{size[1]}, expected {resolution}x{resolution}")

    def _check_moments_shape(self, shape: tuple[int, ...], name: str) -> None:
        if shape != self.moments_shape:
            c = self._channels
            raise UnreadableSample(f"{self.latents.describe(name)} has shape {shape}, expected {self.moments_shape} "
                                   f"(mean||std of {c}-channel latents at {self.resolution}/{VAE_STRIDE})")

    def _check_moments_dtype(self, dtype: np.dtype, name: str) -> None:
        """Moments are floats; an integer (or bool, complex) file is refused, never cast: it was written by
        something else (quantised or label data), and a cast would train on it silently."""
        if not np.issubdtype(dtype, np.floating):
            raise UnreadableSample(f"{self.latents.describe(name)} holds {dtype} values, not floating-point VAE "
                                   f"moments (mean||std); re-encode it with preprocessing/dataset_tools.py encode")

    @property
    def latent_channels(self) -> int:
        """C, the channels of one latent (the moments file holds 2C)."""
        return self._channels

    def __len__(self) -> int:
        return len(self.listing)

    def read_bytes(self, side: str, idx: int) -> bytes:
        """The stored bytes of item idx's image or latent file ("image", "latent")."""
        return self._files[side].read(idx)

    def describe(self, side: str, idx: int) -> str:
        """Where item idx's image or latent file lives, for messages."""
        return self._files[side].describe(idx)

    def _read(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One item; every failure raises UnreadableSample naming the file."""
        files, latent_name, row = self._files, self.latent_names[idx], self.listing.row(idx)
        where = files["image"].describe(idx)
        try:
            data = files["image"].read(idx, row)
        except OSError as e:
            raise UnreadableSample(f"cannot read image {where}: {e}") from e
        image = decode_image(data, where)
        if image.shape != (self.resolution, self.resolution, 3):
            raise UnreadableSample(f"{where} is {image.shape[1]}x{image.shape[0]}, expected "
                                   f"{self.resolution}x{self.resolution}")
        try:
            moments = np.load(io.BytesIO(files["latent"].read(idx, row)), allow_pickle=False)
        except Exception as e:
            raise UnreadableSample(f"corrupt or unreadable latent file {files['latent'].describe(idx)}: {e}") from e
        self._check_moments_shape(moments.shape, latent_name)
        self._check_moments_dtype(moments.dtype, latent_name)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(moments.astype(np.float32, copy=False)),
                torch.tensor(int(row["label"] if row is not None else self.listing.labels[idx]), dtype=torch.int64))

    def readable(self, idx: int) -> bool:
        try:
            self._read(idx)
        except (OSError, RuntimeError, ValueError):
            return False
        return True

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, ...]:
        if not self.skip_bad_samples:
            return self._read(idx)
        n = len(self)
        for k in range(n):
            j = (idx + k) % n
            try:
                item = self._read(j)
            except (OSError, RuntimeError, ValueError) as e:
                key = f"{self.image_names[j]}|{self.latent_names[j]}"
                if key not in self._reported:  # once per file (and process), not once per epoch
                    self._reported.add(key)
                    log.warning(f"skipping a bad sample (item {j}, replaced by the next readable one): {e}")
                continue
            return (*item, torch.tensor(k > 0))
        raise UnreadableSample(f"no item of {self.images.path} / {self.latents.path} can be read")
