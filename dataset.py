"""The training dataset: uint8 images paired with pre-computed SD-VAE posterior moments.

On-disk layout (what REPA/REG users already have; read as is; docs/design.md#data-layout):

    DATA/imagenet_{R}_vae/00000/img00000000.png ...           uint8 RGB, R x R
    DATA/vae-sd/00000/img-mean-std-00000000.npy ...           float32 (2C, R/8, R/8) = mean || std
    DATA/vae-sd/dataset.json   {"labels": [["00000/img-mean-std-00000000.npy", cls], ...],
                                "vae": {"name", "latent_channels", "scaling_factor", "resolution"}}

The image folder may also be REG's `imagenet_256_vae` at any resolution (REG dataset.py reads that
name even at 512 px) or REPA's `images`; `CustomDataset.layout` says which one was found.
Either folder may instead be an uncompressed zip holding the same relative paths
(DATA/imagenet_{R}_vae.zip, DATA/vae-sd.zip); zips move better on cluster file systems.
Images and latents pair up by the index in their names (img00000005.png <-> img-mean-std-00000005.npy);
a file without a partner is an error. The optional "vae" entry is written by our
`preprocessing/dataset_tools.py encode`; without it (official data) the SD-VAE defaults hold:
4 latent channels, scaling factor 0.18215.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import zipfile

import PIL.Image
import numpy as np
import torch
from torch.utils.data import Dataset

from models.vae import SD_VAE_SCALING_FACTOR, VAE_STRIDE
from reg.utils import UserError

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
    """Read-only access to a folder or an uncompressed zip by '/'-separated relative names.

    The zip handle is opened lazily and re-opened in each process (DataLoader workers fork:
    a ZipFile shared across processes would interleave seeks on one file descriptor).
    """

    def __init__(self, path: str):
        self.path = str(path)
        self.is_zip = os.path.isfile(self.path) and self.path.lower().endswith(".zip")
        if not self.is_zip and not os.path.isdir(self.path):
            raise FileNotFoundError(f"no such folder or .zip: {self.path}")
        self.prefix = ""
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        if self.is_zip:
            names = [n for n in self._zipfile().namelist() if not n.endswith("/")]
            # `zip -r vae-sd.zip vae-sd` puts everything under "vae-sd/": accept that too.
            stem = os.path.splitext(os.path.basename(self.path))[0] + "/"
            if names and all(n.startswith(stem) for n in names):
                self.prefix = stem
            self._names = sorted(n[len(self.prefix):] for n in names)

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

    def list(self) -> list[str]:
        """All file names, sorted, relative to the root, '/'-separated."""
        if self.is_zip:
            return list(self._names)
        names = []
        # Symlinked folders are followed (a class folder b -> elsewhere/ is a class like any other; not
        # following it would drop class b and shift every later label), refusing a link into its own ancestry.
        for root, dirs, files in os.walk(self.path, followlinks=True):
            rel = os.path.relpath(root, self.path)
            real = os.path.realpath(root)
            for d in dirs:
                target = os.path.realpath(os.path.join(root, d))
                if real == target or real.startswith(target.rstrip(os.sep) + os.sep):
                    raise UserError(f"{os.path.join(root, d)} is a symbolic link to {target}, a folder that "
                                    f"contains it: the listing of {self.path} would never end; remove the link")
            for f in files:
                names.append(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/"))
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
        name = name.replace("\\", "/")
        if name in out:
            raise UserError(f"{where}: {name!r} is listed twice")
        out[name] = cls
    return out


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


class UnsupportedImageMode(UserError):
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
        raise RuntimeError(f"corrupt or unreadable image {where}: {e}") from e


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


class CustomDataset(Dataset):
    """Training items: images paired with their VAE posterior moments and class labels.

    Items are `(image uint8 (3, R, R), moments float32 (2C, R/8, R/8), label int64 ())`. With
    `skip_bad_samples=True` they are 4-tuples `(image, moments, label, replaced bool ())`: an item
    whose image or latent cannot be read (or has the wrong shape) is logged once per file and
    replaced by the next index that reads fine (wrapping around), with `replaced=True` so that the
    trainer can count them. The replacement depends only on the files, never on timing or worker
    order, so a resumed run reads exactly the same batches. With `skip_bad_samples=False` (the
    default, and REG's behaviour) a bad item raises an error naming the file.

    Images and latents are paired by the index in their names (img00000005.png <->
    img-mean-std-00000005.npy), never by position; a file without a partner is an error. Labels come
    from vae-sd/dataset.json and must be integers in [0, num_classes); an unlabelled dataset
    ("labels": null) is only accepted with num_classes == 1 (every label 0).

    Start-up validation is cheap: two listings, dataset.json, and the headers of the first image
    and the first latent file. Everything else is checked per item as it is read.
    """

    def __init__(self, data_dir: str, *, resolution: int = 256, num_classes: int = 1000,
                 latent_channels: int | None = None, skip_bad_samples: bool = False):
        self.data_dir = str(data_dir)
        self.resolution = resolution
        self.num_classes = num_classes
        self.skip_bad_samples = skip_bad_samples
        self.vae_stride = VAE_STRIDE
        self._reported: set[str] = set()  # files already logged as bad (per process)
        if resolution % VAE_STRIDE:
            raise UserError(f"resolution {resolution} is not a multiple of the VAE stride {VAE_STRIDE}")

        # The VAE description first: a resolution mismatch explains a missing image folder.
        self.latents = open_tree(self.data_dir, LATENT_DIR)
        meta = read_dataset_json(self.latents)
        json_where = self.latents.describe("dataset.json")
        self.vae_info = {**SD_VAE_INFO, "resolution": resolution, **(meta.get("vae") or {})}
        if int(self.vae_info["resolution"]) != resolution:
            raise UserError(f"{json_where} says the latents are for resolution "
                             f"{self.vae_info['resolution']}, but resolution={resolution} was asked for")

        image_base, self.layout = find_image_dir(self.data_dir, resolution)
        self.images = open_tree(self.data_dir, image_base)
        log.info(f"dataset: {self.layout} in {self.data_dir}")
        self.image_names, self.latent_names = self._pair_files()
        self.labels = self._read_labels(meta, json_where)
        self._check_first_files(latent_channels, json_where)

    def _pair_files(self) -> tuple[list[str], list[str]]:
        """The image and latent names, paired by the index in the names (REG/REPA pair by sorted position,
        which silently shifts every later pair when one file is missing), in the latents' sorted order."""
        image_names = [n for n in self.images.list() if is_image_name(n)]
        latent_names = [n for n in self.latents.list() if n.endswith(".npy")]
        if not latent_names and not image_names:
            raise UserError(f"no images/latents found in {self.images.path} and {self.latents.path}")
        by_image = _index_names(image_names, _IMAGE_INDEX, self.images, "image")
        by_latent = _index_names(latent_names, _LATENT_INDEX, self.latents, "latent")
        lonely_latents = sorted(set(by_latent) - set(by_image))
        lonely_images = sorted(set(by_image) - set(by_latent))
        if lonely_latents or lonely_images:
            parts = []
            if lonely_latents:
                parts.append(f"{len(lonely_latents)} latent file(s) without an image, e.g. "
                             f"{self.latents.describe(by_latent[lonely_latents[0]])}")
            if lonely_images:
                parts.append(f"{len(lonely_images)} image(s) without a latent file, e.g. "
                             f"{self.images.describe(by_image[lonely_images[0]])}")
            raise UserError(f"images and latents do not pair up ({len(image_names)} images in {self.images.path}, "
                             f"{len(latent_names)} .npy files in {self.latents.path}): " + "; ".join(parts))
        keys = sorted(by_latent, key=lambda k: by_latent[k])  # the latents' sorted order, as REG's
        return [by_image[k] for k in keys], [by_latent[k] for k in keys]

    def _read_labels(self, meta: dict, json_where: str) -> np.ndarray:
        """The labels of self.latent_names, from vae-sd/dataset.json: one per file, in [0, num_classes)."""
        num_classes = self.num_classes
        labels = parse_labels(meta, json_where)
        if labels is None:
            if num_classes != 1:
                raise UserError(f"{json_where} has no labels (\"labels\": null: an unlabelled dataset); train it "
                                 f"unconditionally with --num-classes 1, or re-encode from labelled images")
            labels = {n: 0 for n in self.latent_names}
        missing = [n for n in self.latent_names if n not in labels]
        if missing:
            raise UserError(f"{len(missing)} latent file(s) have no label in {json_where}, e.g. {missing[0]}")
        if len(labels) != len(self.latent_names):
            extra = sorted(set(labels) - set(self.latent_names))
            raise UserError(f"{json_where} labels {len(extra)} file(s) that are not in {self.latents.path}, "
                             f"e.g. {extra[0]} (an incomplete copy?)")
        array = np.array([labels[n] for n in self.latent_names], dtype=np.int64)
        bad = np.flatnonzero((array < 0) | (array >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise UserError(f"{bad.size} label(s) outside [0, {num_classes}), e.g. {self.latent_names[i]} "
                             f"has label {array[i]} (set num_classes to match the data)")
        return array

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
            with self.latents.open(first) as f:
                shape, dtype = read_npy_header(f)
        except ValueError as e:
            raise RuntimeError(f"corrupt latent file {self.latents.describe(first)}: {e}") from e
        self._check_moments_shape(tuple(shape), first)
        self._check_moments_dtype(dtype, first)
        with self.images.open(self.image_names[0]) as f:
            try:
                size = PIL.Image.open(f).size
            except Exception as e:
                raise RuntimeError(f"corrupt or unreadable image {self.images.describe(self.image_names[0])}: {e}") from e
        if size != (resolution, resolution):
            raise UserError(f"{self.images.describe(self.image_names[0])} is {size[0]}x{size[1]}, "
                             f"expected {resolution}x{resolution}")

    def _check_moments_shape(self, shape: tuple[int, ...], name: str) -> None:
        if shape != self.moments_shape:
            c = self._channels
            raise UserError(f"{self.latents.describe(name)} has shape {shape}, expected {self.moments_shape} "
                             f"(mean||std of {c}-channel latents at {self.resolution}/{VAE_STRIDE})")

    def _check_moments_dtype(self, dtype: np.dtype, name: str) -> None:
        """Moments are floats; an integer (or bool, complex) file is refused, never cast: it was written by
        something else (quantised or label data), and a cast would train on it silently."""
        if not np.issubdtype(dtype, np.floating):
            raise UserError(f"{self.latents.describe(name)} holds {dtype} values, not floating-point VAE moments "
                            f"(mean||std); re-encode it with preprocessing/dataset_tools.py encode")

    @property
    def latent_channels(self) -> int:
        """C, the channels of one latent (the moments file holds 2C)."""
        return self._channels

    def __len__(self) -> int:
        return len(self.latent_names)

    def _read(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One item; every failure raises an error that names the file."""
        image_name, latent_name = self.image_names[idx], self.latent_names[idx]
        where = self.images.describe(image_name)
        try:
            data = self.images.read(image_name)
        except OSError as e:
            raise RuntimeError(f"cannot read image {where}: {e}") from e
        image = decode_image(data, where)
        if image.shape != (self.resolution, self.resolution, 3):
            raise UserError(f"{where} is {image.shape[1]}x{image.shape[0]}, expected {self.resolution}x{self.resolution}")
        try:
            moments = np.load(io.BytesIO(self.latents.read(latent_name)), allow_pickle=False)
        except Exception as e:
            raise RuntimeError(f"corrupt or unreadable latent file {self.latents.describe(latent_name)}: {e}") from e
        self._check_moments_shape(moments.shape, latent_name)
        self._check_moments_dtype(moments.dtype, latent_name)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(moments.astype(np.float32, copy=False)),
                torch.tensor(self.labels[idx], dtype=torch.int64))

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
        raise RuntimeError(f"no item of {self.images.path} / {self.latents.path} can be read")
