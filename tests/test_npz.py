"""Tests for evaluations/npz.py: streaming `arr_0` from stored and compressed npz files, and
corrupt members (CRC-32, bad deflate data) reported as errors naming the file."""
from __future__ import annotations

import struct
import zipfile

import numpy as np
import pytest

from evaluations import npz
from evaluations.common import EvalInputError

# ----------------------------------------------------------------------------------------------
# Streaming arr_0 in batches
# ----------------------------------------------------------------------------------------------

def test_npz_reader_streams_stored_and_compressed(tmp_path):
    rng = np.random.default_rng(12)
    images = rng.integers(0, 256, (11, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images, labels=np.arange(11))  # zip64 local headers (numpy)
    np.savez_compressed(tmp_path / "packed.npz", images)
    for name, mapped in (("plain.npz", True), ("packed.npz", False)):
        reader = npz.NpzImageReader(str(tmp_path / name))
        assert reader.memory_mapped == mapped and len(reader) == 11 and reader.shape == (11, 5, 6, 3)
        batches = list(reader.batches(4))
        assert [len(b) for b in batches] == [4, 4, 3]
        np.testing.assert_array_equal(np.concatenate(batches), images)
        if mapped:  # views into the file, not copies of the whole array
            assert isinstance(batches[0].base, np.memmap) or isinstance(batches[0], np.memmap)


# ----------------------------------------------------------------------------------------------
# Corrupt files: zipfile's CRC-32 and deflate checks, and ours on memory-mapped members
# ----------------------------------------------------------------------------------------------

def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _member_data_start(path, member):
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def test_corrupt_stored_member_fails_crc(tmp_path):
    # Large enough that opening the member (header only) does not read it whole through zipfile.
    images = np.random.default_rng(30).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    path = tmp_path / "flipped.npz"
    np.savez(path, images)
    start, size = _member_data_start(path, "arr_0.npy")
    _flip_byte(path, start + size - 5)  # inside the last image
    reader = npz.NpzImageReader(str(path))
    assert reader.memory_mapped
    with pytest.raises(EvalInputError, match=r"flipped.npz: member arr_0.npy fails its CRC-32 check"):
        list(reader.batches(4))


def test_corrupt_compressed_member_is_an_error(tmp_path):
    images = np.random.default_rng(31).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    path = tmp_path / "packed.npz"
    np.savez_compressed(path, images)
    start, size = _member_data_start(path, "arr_0.npy")
    _flip_byte(path, start + size // 2)
    with pytest.raises(EvalInputError, match=r"packed.npz: member arr_0.npy (is corrupt|fails its CRC-32)"):
        list(npz.NpzImageReader(str(path)).batches(4))


def test_corrupt_stored_statistics_member_is_an_error(tmp_path):
    path = tmp_path / "stats.npz"
    np.savez(path, np.zeros((5, 8, 8, 3), np.uint8), mu=np.ones(2048), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    start, _ = _member_data_start(path, "mu.npy")
    _flip_byte(path, start + 200)
    with pytest.raises(EvalInputError, match=r"stats.npz: corrupt npz member .*mu.npy"):
        npz.inspect_batch(str(path))
