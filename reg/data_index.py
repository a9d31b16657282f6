"""The data reader's index file: a data folder's listing as numpy arrays, read without a Python object per entry
(docs/data.md#the-index).

A listing of ImageNet's 1.28M images and latents held as Python objects takes 35-58 s to build and ~1.5 GB per
process, and every DataLoader worker built its own. Here it is a handful of arrays in one uncompressed npz,
written once: one row per item (label; where its zip members lie, their sizes and CRC-32s), the names as one
byte blob plus offsets, the labels, encode's record. A process reads an item's row with one positioned read
(IndexFile.rows); whole arrays are memory-mapped only for a one-off pass (the labels' range, the data check).

What decides whether an index is still the data's (`zip_digest`, `entries_digest`, `folder_digest`,
`file_digest`):
- a zip: the sha256 of its central directory and end records (every member's name, offset, sizes and
  CRC-32) and of the file's size, so a zip rewritten with the same names and sizes but other bytes,
  other offsets or another prefix has another digest; a copy elsewhere keeps it;
- a folder: the names in its root (its lock and temporary files aside), and the inode, mtime and ctime of
  every directory below: a file added, removed, renamed or replaced by a rename changes its directory's
  ctime, which nothing can set back; a file rewritten in place does not (the reader opens it by name and
  reads all of it, so the index stays true but for that file's size; its content is what the data check of
  docs/data.md looks at);
- the label file and the encode record's settings: the sha256 of their bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reg.folder_lock import LOCK_NAME
from reg.utils import atomic_write, file_sha256

INDEX_VERSION = 1  # bump when the arrays or their meaning change: older files are then rebuilt
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: sig, disks, entries, cd size, cd offset, comment
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # sig, size, versions, disks, entries, entries, cd size, cd offset
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header: sig ... name length, extra length (30 bytes)


# ----------------------------------------------------------------------------- fingerprints

def zip_digest(path: str) -> str:
    """sha256 of a zip's size and of everything from its central directory to the end."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_len = min(size, _EOCD.size + 0xFFFF + _ZIP64_LOCATOR.size + _ZIP64_EOCD.size)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        pos = tail.rfind(b"PK\x05\x06")  # as zipfile finds it (a comment holding the signature defeats both)
        if pos < 0 or pos + _EOCD.size > len(tail):
            raise zipfile.BadZipFile(f"{path}: no end of central directory record")
        cd_size, end = _EOCD.unpack_from(tail, pos)[5], pos
        locator = pos - _ZIP64_LOCATOR.size
        if locator >= _ZIP64_EOCD.size and tail[locator:locator + 4] == b"PK\x06\x07":
            end = locator - _ZIP64_EOCD.size  # the zip64 record sits right before its locator
            if tail[end:end + 4] != b"PK\x06\x06":
                raise zipfile.BadZipFile(f"{path}: corrupt zip64 end of central directory record")
            cd_size = _ZIP64_EOCD.unpack_from(tail, end)[8]
        start = size - tail_len + end - cd_size
        if start < 0:
            raise zipfile.BadZipFile(f"{path}: the central directory size exceeds the file")
        h = hashlib.sha256(f"{size}:{start}:".encode())
        f.seek(start)
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def entries_digest(folder: str) -> str:
    """sha256 of the names in a folder, its lock and temporary files aside (reg/folder_lock.py's, and
    reg.utils.atomic_write's `.NAME.*.tmp`): a data folder's root, whose own ctime every lock heartbeat moves."""
    names = sorted(n for n in os.listdir(folder)
                   if not (n.startswith(LOCK_NAME) or (n.startswith(".") and n.endswith(".tmp"))))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def stat_folders(root: str, dirs: Sequence[str]) -> list[tuple[str, os.stat_result]] | None:
    """(name, stat) of each directory under root; None when one of them is gone."""
    try:
        return [(d, os.stat(os.path.join(root, d))) for d in dirs]
    except OSError:
        return None


def folder_digest(stats: Sequence[tuple[str, os.stat_result]] | None) -> str | None:
    """sha256 of (name, inode, mtime, ctime) of each directory (stat_folders, or FileTree.dir_stats)."""
    if stats is None:
        return None
    h = hashlib.sha256()
    for d, st in stats:
        h.update(f"{d}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


def file_digest(path: str) -> str | None:
    """sha256 of a file's bytes (reg.utils.file_sha256); None when there is no such file."""
    try:
        return file_sha256(path)
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- zip members

def zip_data_offsets(path: str, infos: Sequence[zipfile.ZipInfo]) -> np.ndarray:
    """Where each member's stored bytes start: its local header's offset plus the header, name and extra
    field, read from the local header itself (its extra field may differ from the central directory's).
    -1 for a member whose local header is not what the central directory says (read as an error)."""
    out = np.full(len(infos), -1, np.int64)
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in sorted(range(len(infos)), key=lambda k: infos[k].header_offset):  # in file order
            info = infos[i]
            name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
            head = os.pread(fd, _LOCAL.size + len(name), info.header_offset)
            if len(head) == _LOCAL.size + len(name) and head[:4] == b"PK\x03\x04" and head[_LOCAL.size:] == name:
                name_len, extra_len = _LOCAL.unpack_from(head)[-2:]
                out[i] = info.header_offset + _LOCAL.size + name_len + extra_len
    finally:
        os.close(fd)
    return out


class PinnedFile:
    """A file read by positioned reads (no seek: one descriptor serves every thread) on one descriptor per
    process, and always the file that was there when this object was made: a process that opens it later (a
    DataLoader worker) refuses a file replaced since (an index rebuilt by another job, a zip copied over) rather
    than read other bytes at the old offsets."""

    def __init__(self, path: str):
        st = os.stat(path)
        self.path, self.identity = path, (st.st_dev, st.st_ino, st.st_size)
        self._fd: int | None = None
        self._pid: int | None = None

    def __getstate__(self):  # a spawned worker opens its own descriptor
        return {**self.__dict__, "_fd": None, "_pid": None}

    def pread(self, size: int, offset: int) -> bytes:
        if self._pid != os.getpid():
            fd = os.open(self.path, os.O_RDONLY)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size) != self.identity:
                os.close(fd)
                raise OSError(f"{self.path} was replaced after this run opened it; start again")
            self._fd, self._pid = fd, os.getpid()
        return os.pread(self._fd, size, offset)


def read_member(file: PinnedFile, offset: int, stored: int, size: int, crc: int, method: int) -> bytes:
    """One zip member's bytes, inflated if deflated, checked against its size and CRC-32 as zipfile checks
    them; OSError when they disagree."""
    if offset < 0:
        raise OSError("its local zip header does not match the central directory")
    data = file.pread(stored, offset)
    if len(data) != stored:
        raise OSError(f"truncated zip: {len(data)} of {stored} bytes")
    if method == zipfile.ZIP_DEFLATED:
        try:
            data = zlib.decompress(data, -15)
        except zlib.error as e:
            raise OSError(f"bad deflate data ({e})") from e
    if len(data) != size or zlib.crc32(data) != crc:
        raise OSError(f"fails its CRC-32 check (stored {crc:08x}, read {zlib.crc32(data):08x})")
    return data


# ----------------------------------------------------------------------------- names without Python objects

def pack_names(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(utf-8 bytes of all names back to back (uint8), start offsets (int64, len + 1))."""
    encoded = [n.encode() for n in names]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


class Tables:
    """Named arrays: an index kept in memory (one that could not be written anywhere). IndexFile reads the
    same from a file."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def shape(self, key: str) -> tuple[int, ...]:
        return self.arrays[key].shape

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return self.arrays[key][start:stop]

    def array(self, key: str) -> np.ndarray:
        return self.arrays[key]


class IndexFile(Tables):
    """The arrays of an index file. Rows are read by positioned reads (one descriptor per process), so that
    no page of the file is mapped into a DataLoader worker: the kernel maps whole page-cache folios around a
    mapped read (~130 KB per random row here), and a worker would soon hold all of it. A whole array is
    memory-mapped for a one-off pass over it (dropping the map unmaps it)."""

    def __init__(self, path: str, members: dict[str, tuple[int, np.dtype, tuple[int, ...]]]):
        self.path, self.members = path, members  # key -> (offset of the data in the file, dtype, shape)
        self.file = PinnedFile(path)

    def __contains__(self, key: str) -> bool:
        return key in self.members

    def shape(self, key: str) -> tuple[int, ...]:
        return self.members[key][2]

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        offset, dtype, shape = self.members[key]
        row = dtype.itemsize * int(np.prod(shape[1:]))
        data = self.file.pread((stop - start) * row, offset + start * row)
        return np.frombuffer(data, dtype).reshape(-1, *shape[1:])

    def array(self, key: str) -> np.ndarray:
        offset, dtype, shape = self.members[key]
        return np.memmap(self.path, dtype, "r", offset=offset, shape=shape) if int(np.prod(shape)) else \
            np.zeros(shape, dtype)


class NameTable(Sequence):
    """Names packed by pack_names into tables[KEY_names] and tables[KEY_name_offsets], read one at a time:
    a list's interface without a str per entry."""

    def __init__(self, tables: Tables, key: str):
        self.tables, self.key = tables, key

    def __len__(self) -> int:
        return self.tables.shape(f"{self.key}_name_offsets")[0] - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"name {i} of {n}")
        i = int(i) % n
        start, end = self.tables.rows(f"{self.key}_name_offsets", i, i + 2).tolist()
        return self.tables.rows(f"{self.key}_names", start, end).tobytes().decode()


# ----------------------------------------------------------------------------- the file

def save(path: str | os.PathLike, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """meta (JSON) and the arrays in one uncompressed npz, written atomically."""
    blob = np.frombuffer(json.dumps({**meta, "version": INDEX_VERSION}, sort_keys=True).encode(), np.uint8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, meta=blob, **arrays)
    atomic_write(path, write)


def verify(path: str | os.PathLike) -> None:
    """Every member's CRC-32 (reading the file, not mapping it); ValueError when one fails."""
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"{path}: member {bad} fails its CRC-32 check")


def load(path: str | os.PathLike) -> tuple[dict, IndexFile]:
    """(meta, the arrays) of a file written by save (`verify` checks its bytes); ValueError, OSError or
    zipfile.BadZipFile when the file is damaged, foreign or of another version."""
    path = str(path)
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    members = {}
    with open(path, "rb") as f:
        for info, start in zip(infos, zip_data_offsets(path, infos)):
            if info.compress_type != zipfile.ZIP_STORED or start < 0 or not info.filename.endswith(".npy"):
                raise ValueError(f"{path}: {info.filename} is not a stored .npy member")
            f.seek(start)
            read_header = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject or (fortran and len(shape) > 1):
                raise ValueError(f"{path}: {info.filename} is not a C-ordered array of plain values")
            members[info.filename[:-4]] = (f.tell(), dtype, tuple(shape))
    index = IndexFile(path, members)
    meta = json.loads(index.rows("meta", 0, index.shape("meta")[0]).tobytes())
    if meta.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: index version {meta.get('version')}, this code writes {INDEX_VERSION}")
    return meta, index


def locations(data_dir: str, name: str) -> list[Path]:
    """Where the index of DATA/name is kept: beside the data, else in the user's cache folder
    ($XDG_CACHE_HOME or ~/.cache, under reg/data-index/, named after the data folder's real path)."""
    cache = os.environ.get("XDG_CACHE_HOME") or ""
    cache_root = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"  # XDG: a relative value is ignored
    key = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:16]
    return [Path(data_dir) / f"reg-index-{name}.npz", cache_root / "reg" / "data-index" / f"{key}-{name}.npz"]
