"""Reading the evaluator's npz inputs without loading them whole (docs/design.md#evaluation): images
(`arr_0`, uint8 NHWC, ADM's format) streamed in batches with their CRC-32 checked, ADM's stored
statistics (`mu, sigma, mu_s, sigma_s`), and the features and metadata that --save-stats writes."""
from __future__ import annotations

import contextlib
import json
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from evaluations.common import FEATURES_KEY, POOL_DIM, STAT_KEYS, STAT_SHAPES, EvalInputError


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: no such file")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise EvalInputError(f"{path}: not an .npz file (expected np.savez output with arr_0): {e}") from e


def npz_keys(path: str) -> list[str]:
    with _open_zip(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def check_images(shape: tuple, dtype: np.dtype, path: str) -> None:
    """ADM's format: arr_0 uint8 NHWC, 3 channels. Anything else would silently give wrong numbers."""
    if dtype != np.uint8:
        hint = (" Float images must be converted first, e.g. ((x + 1) * 127.5).round().clip(0, 255)"
                ".astype(np.uint8) for [-1, 1] data." if np.issubdtype(dtype, np.floating) else "")
        raise EvalInputError(f"{path}: arr_0 has dtype {dtype}, expected uint8 images in [0, 255].{hint}")
    if len(shape) != 4:
        raise EvalInputError(f"{path}: arr_0 has shape {shape}, expected (N, H, W, 3) uint8")
    if shape[-1] != 3:
        if shape[1] == 3:
            raise EvalInputError(f"{path}: arr_0 has shape {shape}, which looks channels-first (N, 3, H, W); "
                                 "expected channels-last (N, H, W, 3): save x.transpose(0, 2, 3, 1)")
        raise EvalInputError(f"{path}: arr_0 has shape {shape}, expected 3 RGB channels last (N, H, W, 3)")
    if shape[0] == 0:
        raise EvalInputError(f"{path}: arr_0 holds no images")


def _read_exact(f, size: int, path: str) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = f.read(size - len(buf))
        if not chunk:
            raise EvalInputError(f"{path}: arr_0 is truncated (wanted {size} more bytes)")
        buf += chunk
    return bytes(buf)


class NpzImageReader:
    """Batches of `arr_0` from an .npz, never the whole array in RAM.

    np.savez stores members uncompressed: the array is then memory-mapped at the member's offset in
    the zip. A compressed npz (np.savez_compressed) is decompressed sequentially, one batch at a time.
    """

    def __init__(self, path: str, key: str = "arr_0"):
        self.path, self.member = path, f"{key}.npy"
        with _open_zip(path) as zf:
            if self.member not in zf.namelist():
                keys = [n[:-4] for n in zf.namelist()]
                raise EvalInputError(f"{path}: no '{key}' array in this npz (found {keys}); expected the "
                                     f"images as {key}, uint8 (N, H, W, 3), as written by np.savez(path, images)")
            info = zf.getinfo(self.member)
            try:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise EvalInputError(f"{path}: unsupported .npy format version {version} for {key}")
                    self._header_len = f.tell()
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a small member is read whole: CRC checked
                raise EvalInputError(f"{path}: member {self.member} is corrupt ({type(e).__name__}: {e})") from e
        check_images(shape, dtype, path)
        self.shape, self.dtype = tuple(shape), dtype

        nbytes = int(np.prod(shape)) * dtype.itemsize
        if info.file_size < self._header_len + nbytes:
            raise EvalInputError(f"{path}: {key} is truncated ({info.file_size} bytes for shape {shape})")
        self._memmap = self._raw = None
        self._crc, self._member_size, self._fortran = info.CRC, info.file_size, fortran
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            start = self._member_data_offset(path, info)
            self._memmap = np.memmap(path, dtype=dtype, mode="r", offset=start + self._header_len,
                                     shape=self.shape, order="F" if fortran else "C")
            # The member's bytes as stored, for its CRC-32 (the memmap bypasses zipfile's check).
            self._raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(info.file_size,))
        elif fortran:
            raise EvalInputError(f"{path}: {key} is Fortran-ordered inside a compressed npz and cannot be "
                                 "streamed; re-save it with np.savez(path, np.ascontiguousarray(x))")

    @staticmethod
    def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
        # The local header's extra field (zip64 sizes, written by np.savez) may differ from the central
        # directory's, so read its lengths from the local header itself.
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise EvalInputError(f"{path}: corrupt zip local header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len

    @property
    def memory_mapped(self) -> bool:
        return self._memmap is not None

    def __len__(self) -> int:
        return self.shape[0]

    def _check_crc(self, crc: int) -> None:
        if crc & 0xFFFFFFFF != self._crc:
            raise EvalInputError(f"{self.path}: member {self.member} fails its CRC-32 check (stored {self._crc:08x}, "
                                 f"read {crc & 0xFFFFFFFF:08x}): the file is corrupt; re-create or re-download it")

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield (B, H, W, 3) uint8 arrays in file order (views into the memmap, or fresh buffers).
        The member's CRC-32 is checked on the way; a mismatch raises after the last batch."""
        n = len(self)
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        if self._memmap is not None:
            crc, pos = zlib.crc32(self._raw[:self._header_len]), self._header_len
            for i in range(0, n, batch_size):
                if not self._fortran:  # C order: this batch is the next stretch of the file
                    end = self._header_len + min(i + batch_size, n) * row_bytes
                    crc, pos = zlib.crc32(self._raw[pos:end], crc), end
                yield self._memmap[i:i + batch_size]
            for start in range(pos, self._member_size, 1 << 26):  # the rest (all of it when Fortran-ordered)
                crc = zlib.crc32(self._raw[start:min(start + (1 << 26), self._member_size)], crc)
            self._check_crc(crc)
            return
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                crc = zlib.crc32(_read_exact(f, self._header_len, self.path))
                for i in range(0, n, batch_size):
                    b = min(batch_size, n - i)
                    data = _read_exact(f, b * row_bytes, self.path)
                    crc = zlib.crc32(data, crc)
                    yield np.frombuffer(data, dtype=self.dtype).reshape(b, *self.shape[1:])
                crc = zlib.crc32(f.read(), crc)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # zipfile's own CRC check, bad deflate data
            raise EvalInputError(f"{self.path}: member {self.member} is corrupt ({type(e).__name__}: {e})") from e
        self._check_crc(crc)


@contextlib.contextmanager
def open_npz(path: str) -> Iterator[np.lib.npyio.NpzFile]:
    """np.load, with a corrupt member (CRC mismatch, bad deflate data) reported as an EvalInputError
    naming the file (zipfile's message names the member)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            yield npz
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise EvalInputError(f"{path}: corrupt npz member ({type(e).__name__}: {e}); re-create or re-download "
                             "the file") from e


def read_stored_statistics(path: str) -> Optional[dict[str, np.ndarray]]:
    """`mu, sigma, mu_s, sigma_s` stored in the npz (ADM's reference batches carry them), or None."""
    with open_npz(path) as npz:
        present = [k for k in STAT_KEYS if k in npz.files]
        if not present:
            return None
        if len(present) != len(STAT_KEYS):
            missing = [k for k in STAT_KEYS if k not in present]
            raise EvalInputError(f"{path}: has stored statistics {present} but not {missing}; "
                                 f"ADM's format needs all of {list(STAT_KEYS)}")
        stats = {k: npz[k] for k in STAT_KEYS}
    for k, a in stats.items():
        if a.shape != STAT_SHAPES[k]:
            raise EvalInputError(f"{path}: stored '{k}' has shape {a.shape}, expected {STAT_SHAPES[k]}")
        if not np.isfinite(a).all():
            raise EvalInputError(f"{path}: stored '{k}' contains NaN/inf; these statistics are broken, "
                                 "delete them from the npz (or recompute with --save-stats)")
    return stats


def read_stored_meta(path: str) -> Optional[dict]:
    """JSON metadata that --save-stats writes next to the statistics (never pickle)."""
    with open_npz(path) as npz:
        if "meta" not in npz.files:
            return None
        return json.loads(str(npz["meta"]))


@dataclass
class BatchInfo:
    """What an input npz holds, checked before any expensive work."""
    path: str
    keys: list[str]
    num_images: int
    image_shape: Optional[tuple]  # (H, W, 3), None for a features-only stats file
    stored_stats: bool


def inspect_batch(path: str) -> BatchInfo:
    keys = npz_keys(path)
    stored = read_stored_statistics(path) is not None  # also validates shapes / NaN
    if "arr_0" in keys:
        reader = NpzImageReader(path)  # validates dtype / layout
        return BatchInfo(path, keys, len(reader), reader.shape[1:], stored)
    if FEATURES_KEY in keys:
        with open_npz(path) as npz:
            shape = npz[FEATURES_KEY].shape
        if len(shape) != 2 or shape[1] != POOL_DIM:
            raise EvalInputError(f"{path}: '{FEATURES_KEY}' has shape {shape}, expected (N, {POOL_DIM})")
        if not stored:
            raise EvalInputError(f"{path}: has '{FEATURES_KEY}' but no stored {list(STAT_KEYS)}; "
                                 "sFID needs either the images (arr_0) or the statistics")
        return BatchInfo(path, keys, shape[0], None, stored)
    raise EvalInputError(f"{path}: no 'arr_0' array in this npz (found {keys}); expected the images as "
                         "arr_0, uint8 (N, H, W, 3), as written by np.savez(path, images) "
                         f"(or a stats file from --save-stats, holding '{FEATURES_KEY}' and {list(STAT_KEYS)})")
