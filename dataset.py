"""The training dataset: uint8 images paired with pre-computed SD-VAE posterior moments (SPEC §4).

On-disk layout (what REPA/REG users already have; read as is):

    DATA/imagenet_{R}_vae/00000/img00000000.png ...           uint8 RGB, R x R
    DATA/vae-sd/00000/img-mean-std-00000000.npy ...           float32 (2C, R/8, R/8) = mean || std
    DATA/vae-sd/dataset.json   {"labels": [["00000/img-mean-std-00000000.npy", cls], ...],
                                "vae": {"name", "latent_channels", "scaling_factor", "resolution"}}

Either folder may instead be an uncompressed zip holding the same relative paths
(DATA/imagenet_{R}_vae.zip, DATA/vae-sd.zip); zips move better on cluster file systems.
Images and latents pair up by sorted relative path. The optional "vae" entry is written by our
`preprocessing/dataset_tools.py encode`; without it (official data) the SD-VAE defaults hold:
4 latent channels, scaling factor 0.18215.
"""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

SD_VAE_INFO = {"name": None, "latent_channels": 4, "scaling_factor": 0.18215}
LATENT_DOWNSAMPLE = 8
LATENT_DIR = "vae-sd"


def image_dir_name(resolution: int) -> str:
    return f"imagenet_{resolution}_vae"


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
        for root, _dirs, files in os.walk(self.path):
            rel = os.path.relpath(root, self.path)
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
        return json.loads(tree.read("dataset.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{tree.describe('dataset.json')} is not valid JSON: {e}") from None


def read_npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy stream, reading only its header."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


def decode_image(data: bytes, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (H, W, 3); errors name the file."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL raises many types for broken files
        raise RuntimeError(f"corrupt or unreadable image {where}: {e}") from e


class CustomDataset(Dataset):
    """(image uint8 (3, R, R), moments float32 (2C, R/8, R/8), label int64 ()) triples.

    Start-up validation is cheap: two listings, dataset.json, and the headers of the first image
    and the first latent file. Everything else is checked per item as it is read.
    """

    def __init__(self, data_dir: str, *, resolution: int = 256, num_classes: int = 1000,
                 latent_channels: int | None = None):
        self.data_dir = str(data_dir)
        self.resolution = resolution
        self.num_classes = num_classes
        if resolution % LATENT_DOWNSAMPLE:
            raise ValueError(f"resolution {resolution} is not a multiple of {LATENT_DOWNSAMPLE}")

        # The VAE description first: a resolution mismatch explains a missing image folder.
        self.latents = open_tree(self.data_dir, LATENT_DIR)
        meta = read_dataset_json(self.latents)
        self.vae_info = {**SD_VAE_INFO, "resolution": resolution, **(meta.get("vae") or {})}
        if int(self.vae_info["resolution"]) != resolution:
            raise ValueError(f"{self.latents.describe('dataset.json')} says the latents are for resolution "
                             f"{self.vae_info['resolution']}, but resolution={resolution} was asked for")

        self.images = open_tree(self.data_dir, image_dir_name(resolution))
        self.image_names = [n for n in self.images.list() if is_image_name(n)]
        self.latent_names = [n for n in self.latents.list() if n.endswith(".npy")]
        if len(self.image_names) != len(self.latent_names):
            raise ValueError(f"image and latent counts differ: {len(self.image_names)} images in "
                             f"{self.images.path}, {len(self.latent_names)} .npy files in {self.latents.path}")
        if not self.latent_names:
            raise ValueError(f"no images/latents found in {self.images.path} and {self.latents.path}")

        # Labels, from vae-sd/dataset.json.
        labels = meta.get("labels")
        if not labels:
            raise ValueError(f"{self.latents.describe('dataset.json')} has no labels")
        labels = {str(name).replace("\\", "/"): cls for name, cls in labels}
        missing = [n for n in self.latent_names if n not in labels]
        if missing:
            raise ValueError(f"{len(missing)} latent file(s) have no label in "
                             f"{self.latents.describe('dataset.json')}, e.g. {missing[0]}")
        self.labels = np.array([labels[n] for n in self.latent_names], dtype=np.int64)
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{bad.size} label(s) outside [0, {num_classes}), e.g. {self.latent_names[i]} "
                             f"has label {self.labels[i]} (set num_classes to match the data)")

        # Channel count: asked for, else from dataset.json; must agree with the files.
        info_channels = int(self.vae_info["latent_channels"])
        if latent_channels is not None and latent_channels != info_channels:
            raise ValueError(f"latent_channels={latent_channels} was asked for, but "
                             f"{self.latents.describe('dataset.json')} describes {info_channels}-channel latents")
        self._channels = info_channels
        self.moments_shape = (2 * info_channels, resolution // LATENT_DOWNSAMPLE, resolution // LATENT_DOWNSAMPLE)
        first = self.latent_names[0]
        try:
            with self.latents.open(first) as f:
                shape, _dtype = read_npy_header(f)
        except ValueError as e:
            raise RuntimeError(f"corrupt latent file {self.latents.describe(first)}: {e}") from e
        self._check_moments_shape(tuple(shape), first)
        with self.images.open(self.image_names[0]) as f:
            try:
                size = PIL.Image.open(f).size
            except Exception as e:
                raise RuntimeError(f"corrupt or unreadable image {self.images.describe(self.image_names[0])}: {e}") from e
        if size != (resolution, resolution):
            raise ValueError(f"{self.images.describe(self.image_names[0])} is {size[0]}x{size[1]}, "
                             f"expected {resolution}x{resolution}")

    def _check_moments_shape(self, shape: tuple[int, ...], name: str) -> None:
        if shape != self.moments_shape:
            c = self._channels
            raise ValueError(f"{self.latents.describe(name)} has shape {shape}, expected {self.moments_shape} "
                             f"(mean||std of {c}-channel latents at {self.resolution}/{LATENT_DOWNSAMPLE})")

    @property
    def latent_channels(self) -> int:
        """C, the channels of one latent (the moments file holds 2C)."""
        return self._channels

    @property
    def num_channels(self) -> int:
        return self._channels

    def __len__(self) -> int:
        return len(self.latent_names)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_name, latent_name = self.image_names[idx], self.latent_names[idx]
        where = self.images.describe(image_name)
        image = decode_image(self.images.read(image_name), where)
        if image.shape != (self.resolution, self.resolution, 3):
            raise ValueError(f"{where} is {image.shape[1]}x{image.shape[0]}, expected {self.resolution}x{self.resolution}")
        try:
            moments = np.load(io.BytesIO(self.latents.read(latent_name)), allow_pickle=False)
        except Exception as e:
            raise RuntimeError(f"corrupt or unreadable latent file {self.latents.describe(latent_name)}: {e}") from e
        self._check_moments_shape(moments.shape, latent_name)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(moments.astype(np.float32, copy=False)),
                torch.tensor(self.labels[idx], dtype=torch.int64))
