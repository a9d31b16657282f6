"""The data reader's index (reg/data_index.py, dataset.open_listing): the same pairs, labels, bytes and refusals
as the listing it replaces, in folders and zips; never trusted once the data changed, even with the same names
and sizes; written beside the data, else in the cache folder; written by encode; shared by workers."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
from dataset import CustomDataset
from helpers import ROOT, encoded_synthetic_data, make_data, zip_folder
from reg import data_index
from reg.utils import USER_ERRORS

BASES = ("imagenet_32_vae", "vae-sd")


def open_both(root, reports=None, **kw):
    """(indexed, plain) datasets of root (32 px, 10 classes)."""
    indexed = CustomDataset(str(root), resolution=32, num_classes=10,
                            report=reports.append if reports is not None else lambda m: None, **kw)
    plain = CustomDataset(str(root), resolution=32, num_classes=10, use_index=False, report=lambda m: None, **kw)
    return indexed, plain


def assert_same_items(a: CustomDataset, b: CustomDataset) -> None:
    assert list(a.image_names) == list(b.image_names) and list(a.latent_names) == list(b.latent_names)
    assert np.array_equal(a.labels, b.labels) and a.vae_info == b.vae_info and a.layout == b.layout
    for i in range(len(b)):
        for side in ("image", "latent"):
            assert a.read_bytes(side, i) == b.read_bytes(side, i)
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i]))


def zip_layout(src: Path, dest: Path, *, prefix: bool = False, compression: int = zipfile.ZIP_STORED) -> Path:
    dest.mkdir(exist_ok=True)
    for base in BASES:
        zip_folder(src / base, dest / f"{base}.zip", f"{base}/" if prefix else "", compression)
    return dest


@pytest.mark.parametrize("layout", ["folder", "zip", "zip with prefix", "deflated zip"])
def test_index_reads_the_same_pairs_labels_and_bytes_as_the_listing(tmp_path, layout):
    make_data(tmp_path / "dir", n=7)
    for i in (2, 5):  # gaps in the numbering (convert skipped files): pairing is by the index in the names
        os.remove(tmp_path / "dir" / "imagenet_32_vae" / "00000" / f"img{i:08d}.png")
        os.remove(tmp_path / "dir" / "vae-sd" / "00000" / f"img-mean-std-{i:08d}.npy")
    meta = json.loads((tmp_path / "dir/vae-sd/dataset.json").read_text())
    meta["labels"] = [e for e in meta["labels"] if e[0][-6:-4] not in ("02", "05")]
    (tmp_path / "dir/vae-sd/dataset.json").write_text(json.dumps(meta))
    root = tmp_path / "dir" if layout == "folder" else zip_layout(
        tmp_path / "dir", tmp_path / "zip", prefix=layout == "zip with prefix",
        compression=zipfile.ZIP_DEFLATED if layout == "deflated zip" else zipfile.ZIP_STORED)
    reports = []
    indexed, plain = open_both(root, reports)
    assert indexed.listing.index_path and plain.listing.index_path is None
    assert any("built" in r for r in reports)
    assert_same_items(indexed, plain)
    reports.clear()
    again, _ = open_both(root, reports)  # the second start loads what the first wrote
    assert any("loaded" in r for r in reports) and not any("build" in r for r in reports)
    assert isinstance(again.image_names, data_index.NameTable)  # no Python string per entry
    assert_same_items(again, plain)


def _edit_labels(root, fn):
    path = root / "vae-sd" / "dataset.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _rm(root, rel):
    os.remove(root / rel)


MUTATIONS = {  # name -> a change of a valid data folder that the reader refuses
    "image without latent": lambda r: _rm(r, "vae-sd/00000/img-mean-std-00000003.npy"),
    "latent without image": lambda r: _rm(r, "imagenet_32_vae/00000/img00000003.png"),
    "two images of one index": lambda r: shutil.copy(r / "imagenet_32_vae/00000/img00000001.png",
                                                     (r / "imagenet_32_vae/00001").mkdir() or
                                                     r / "imagenet_32_vae/00001/img00000001.png"),
    "a name without an index": lambda r: shutil.copy(r / "imagenet_32_vae/00000/img00000001.png",
                                                     r / "imagenet_32_vae/00000/cat.png"),
    "no label": lambda r: _edit_labels(r, lambda m: m["labels"].pop(2)),
    "a label of a missing file": lambda r: _edit_labels(r, lambda m: m["labels"].append(["00000/x.npy", 1])),
    "a float label": lambda r: _edit_labels(r, lambda m: m["labels"][1].__setitem__(1, 3.0)),
    "a label of 1e30": lambda r: _edit_labels(r, lambda m: m["labels"][1].__setitem__(1, 10**30)),
    "a label out of range": lambda r: _edit_labels(r, lambda m: m["labels"][1].__setitem__(1, 10)),
    "unlabelled": lambda r: _edit_labels(r, lambda m: m.__setitem__("labels", None)),
    "resolution abc": lambda r: _edit_labels(r, lambda m: m.__setitem__("vae", {"resolution": "abc"})),
    "another resolution": lambda r: _edit_labels(r, lambda m: m.__setitem__("vae", {"resolution": 64})),
    "a vae entry that is a string": lambda r: _edit_labels(r, lambda m: m.__setitem__("vae", "sd")),
    "dataset.json not JSON": lambda r: (r / "vae-sd/dataset.json").write_text("{labels"),
    "first latent of 3 channels": lambda r: np.save(r / "vae-sd/00000/img-mean-std-00000000.npy",
                                                    np.zeros((6, 4, 4), np.float32)),
    "first image 16 px": lambda r: __import__("PIL.Image").Image.new("RGB", (16, 16)).save(
        r / "imagenet_32_vae/00000/img00000000.png"),
    "no image folder": lambda r: shutil.rmtree(r / "imagenet_32_vae"),
}


@pytest.mark.parametrize("zipped", [False, True], ids=["folder", "zip"])
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_refused_in_the_same_cases_even_after_an_index_was_built(tmp_path, mutation, zipped):
    """Index a valid folder, break it, and compare the error of the indexed reader with the listing's: the
    same type and message (the stale index is never trusted)."""
    make_data(tmp_path / "dir", n=5, labels=[1, 2, 3, 4, 5])
    root = zip_layout(tmp_path / "dir", tmp_path / "zip") if zipped else tmp_path / "dir"
    CustomDataset(str(root), resolution=32, num_classes=10, report=lambda m: None)  # the index of valid data
    MUTATIONS[mutation](tmp_path / "dir")
    if zipped:
        for base in BASES:
            (root / f"{base}.zip").unlink(missing_ok=True)
        zip_layout(tmp_path / "dir", root) if (tmp_path / "dir/imagenet_32_vae").exists() else \
            zip_folder(tmp_path / "dir/vae-sd", root / "vae-sd.zip")
    errors = []
    for use_index in (False, True):
        with pytest.raises(Exception) as e:
            CustomDataset(str(root), resolution=32, num_classes=10, use_index=use_index, report=lambda m: None)
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1]
    assert issubclass(errors[0][0], USER_ERRORS)  # a user's mistake: one line from every entry point


def test_two_zip_members_of_one_name_are_refused(tmp_path):
    make_data(tmp_path / "dir", n=3)
    zip_layout(tmp_path / "dir", tmp_path / "zip")
    with zipfile.ZipFile(tmp_path / "zip/imagenet_32_vae.zip", "a") as z, pytest.warns(UserWarning, match="Duplicate"):
        z.writestr("00000/img00000001.png", (tmp_path / "dir/imagenet_32_vae/00000/img00000002.png").read_bytes())
    for use_index in (False, True):
        with pytest.raises(dataset.UserError, match=r"imagenet_32_vae.zip holds two members named '00000/img00000001.png'"):
            CustomDataset(str(tmp_path / "zip"), resolution=32, num_classes=10, use_index=use_index)


# ----------------------------------------------------------------------------- stale indexes

def rebuilt(root, **kw) -> tuple[bool, CustomDataset]:
    """(whether this start rebuilt the index, the dataset)."""
    reports = []
    ds = CustomDataset(str(root), resolution=32, num_classes=10, report=reports.append, **kw)
    return any("stale" in r or "unreadable" in r for r in reports), ds


def test_a_zip_rewritten_with_the_same_names_sizes_and_mtime_but_other_bytes_is_reindexed(tmp_path):
    make_data(tmp_path / "a", n=5, seed=0)
    make_data(tmp_path / "b", n=5, seed=1)  # same names, same sizes (random pixels, uncompressed npy)
    root = zip_layout(tmp_path / "a", tmp_path / "zip")
    assert rebuilt(root)[0] is False
    stamp = os.stat(root / "vae-sd.zip")
    shutil.copy(tmp_path / "zip/vae-sd.zip", tmp_path / "old.zip")
    zip_folder(tmp_path / "b/vae-sd", tmp_path / "new.zip")
    assert os.path.getsize(tmp_path / "new.zip") == stamp.st_size
    shutil.copyfile(tmp_path / "new.zip", root / "vae-sd.zip")
    os.utime(root / "vae-sd.zip", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    was_rebuilt, ds = rebuilt(root)
    assert was_rebuilt
    assert_same_items(ds, open_both(root)[1])  # the new bytes, CRC-checked
    # a copy of data and index elsewhere keeps a zip's index valid (its digest is of content, not of inodes)
    shutil.copytree(root, tmp_path / "copy")
    assert rebuilt(tmp_path / "copy")[0] is False


def test_a_label_edited_in_place_with_the_same_size_and_mtime_is_seen(tmp_path):
    make_data(tmp_path, n=5, labels=[1, 2, 3, 4, 5])
    assert list(rebuilt(tmp_path)[1].labels) == [1, 2, 3, 4, 5]
    path = tmp_path / "vae-sd" / "dataset.json"
    stamp = os.stat(path)
    path.write_text(path.read_text().replace("img-mean-std-00000001.npy\", 2", "img-mean-std-00000001.npy\", 7"))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert os.path.getsize(path) == stamp.st_size
    was_rebuilt, ds = rebuilt(tmp_path)
    assert was_rebuilt and list(ds.labels) == [1, 7, 3, 4, 5]


def test_a_file_added_to_a_folder_whose_mtime_is_put_back_is_seen(tmp_path):
    make_data(tmp_path, n=5)
    assert len(rebuilt(tmp_path)[1]) == 5
    shard = tmp_path / "imagenet_32_vae" / "00000"
    stamp = os.stat(shard)
    shutil.copy(shard / "img00000001.png", shard / "img00000009.png")
    os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # ctime cannot be put back
    with pytest.raises(dataset.UserError, match=r"1 image\(s\) without a latent file, e.g. .*img00000009.png"):
        CustomDataset(str(tmp_path), resolution=32, num_classes=10)


def test_a_damaged_or_older_index_is_rebuilt(tmp_path, monkeypatch):
    make_data(tmp_path, n=5, labels=[1, 2, 3, 4, 5])
    ds = rebuilt(tmp_path)[1]
    path = Path(ds.listing.index_path)
    data = bytearray(path.read_bytes())
    labels_at = data.find(np.array([1, 2, 3, 4, 5], np.int64).tobytes())
    data[labels_at] = 9  # label 1 -> 9 inside the index file
    path.write_bytes(bytes(data))
    was_rebuilt, ds = rebuilt(tmp_path)
    assert was_rebuilt and list(ds.labels) == [1, 2, 3, 4, 5]
    monkeypatch.setattr(data_index, "INDEX_VERSION", data_index.INDEX_VERSION + 1)
    assert rebuilt(tmp_path)[0]
    save = data_index.save  # an index of this version without its rows (written by a broken build)
    monkeypatch.setattr(data_index, "save", lambda p, meta, arrays: save(p, meta, {k: v for k, v in arrays.items()
                                                                                   if k != "items"}))
    path.unlink()
    CustomDataset(str(tmp_path), resolution=32, num_classes=10, report=lambda m: None)
    monkeypatch.setattr(data_index, "save", save)
    was_rebuilt, ds = rebuilt(tmp_path)
    assert was_rebuilt and list(ds.labels) == [1, 2, 3, 4, 5]


def test_index_beside_the_data_else_in_the_cache_else_in_memory(tmp_path, monkeypatch):
    make_data(tmp_path / "data", n=5)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    save = data_index.save
    refused = {tmp_path / "data"}

    def read_only_save(path, meta, arrays):  # the machine runs as root: chmod cannot make a folder read-only
        if Path(path).parent in refused:
            raise PermissionError(13, "Read-only file system", str(path))
        save(path, meta, arrays)
    monkeypatch.setattr(data_index, "save", read_only_save)
    reports = []
    ds = CustomDataset(str(tmp_path / "data"), resolution=32, num_classes=10, report=reports.append)
    assert Path(ds.listing.index_path).is_relative_to(tmp_path / "cache" / "reg" / "data-index")
    assert any("not beside the data" in r and "Read-only" in r for r in reports)
    assert not list((tmp_path / "data").glob("reg-index-*"))
    reports.clear()
    again = CustomDataset(str(tmp_path / "data"), resolution=32, num_classes=10, report=reports.append)
    assert any("loaded" in r for r in reports) and again.listing.index_path == ds.listing.index_path
    shutil.rmtree(tmp_path / "cache")
    refused.add(tmp_path / "cache" / "reg" / "data-index")
    reports.clear()
    memory = CustomDataset(str(tmp_path / "data"), resolution=32, num_classes=10, report=reports.append)
    assert memory.listing.index_path is None and any("kept in memory" in r for r in reports)
    assert_same_items(memory, open_both(tmp_path / "data")[1])


def test_encode_writes_the_index_that_training_loads(tmp_path):
    root = encoded_synthetic_data(tmp_path, num_images=8)
    assert (root / "reg-index-imagenet_32_vae.npz").is_file()
    reports = []
    ds = CustomDataset(str(root), resolution=32, num_classes=4, report=reports.append)
    assert any("loaded" in r for r in reports) and not any("build" in r for r in reports)
    assert len(ds) == 8


# ----------------------------------------------------------------------------- sharing

def test_workers_and_threads_read_through_the_index(tmp_path):
    """Positioned reads: threads sharing one descriptor, and forked workers, get every member's own bytes;
    a spawned worker maps the index again rather than receiving a copy of it."""
    make_data(tmp_path / "dir", n=40)
    indexed, plain = open_both(zip_layout(tmp_path / "dir", tmp_path / "zip"))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: indexed.read_bytes("image", i % 40), range(400)))
    assert got == [plain.read_bytes("image", i % 40) for i in range(400)]
    loader = torch.utils.data.DataLoader(indexed, batch_size=5, num_workers=2)
    images = torch.cat([b[0] for b in loader])
    assert torch.equal(images, torch.stack([plain[i][0] for i in range(40)]))
    blob = pickle.dumps(indexed)  # what a spawned worker receives: the listing is not in it
    assert not [n for n in (*plain.image_names, *plain.latent_names) if n.encode() in blob]
    assert all(n.encode() in pickle.dumps(plain) for n in plain.image_names)
    clone = pickle.loads(blob)
    assert_same_items(clone, plain)


def test_a_corrupt_member_is_named_not_read(tmp_path):
    make_data(tmp_path / "dir", n=3)
    root = zip_layout(tmp_path / "dir", tmp_path / "zip")
    ds = CustomDataset(str(root), resolution=32, num_classes=10)
    with zipfile.ZipFile(root / "vae-sd.zip") as z:
        info = z.getinfo("00000/img-mean-std-00000002.npy")
    data = bytearray((root / "vae-sd.zip").read_bytes())
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF  # a byte of its float data
    (root / "vae-sd.zip").write_bytes(bytes(data))
    ds = CustomDataset(str(root), resolution=32, num_classes=10)  # the zip's directory did not change: kept
    with pytest.raises(dataset.UnreadableSample, match=r"vae-sd.zip:00000/img-mean-std-00000002.npy.*CRC-32"):
        ds[2]


def test_a_zip_replaced_while_a_run_reads_it_is_refused_by_its_workers(tmp_path):
    """The parent read the zip through its descriptor; a worker opened later finds another file at the path (same
    names and sizes, other bytes): it refuses it by name instead of reading other bytes at the index's offsets."""
    make_data(tmp_path / "a", n=4, seed=0)
    make_data(tmp_path / "b", n=4, seed=1)
    root = zip_layout(tmp_path / "a", tmp_path / "zip")
    ds = CustomDataset(str(root), resolution=32, num_classes=10)
    first = ds[1]
    zip_folder(tmp_path / "b" / "vae-sd", tmp_path / "other.zip")
    os.replace(tmp_path / "other.zip", root / "vae-sd.zip")  # a new file (inode) at the same path
    assert all(torch.equal(x, y) for x, y in zip(ds[1], first))  # this process keeps reading what it opened
    with pytest.raises(dataset.UnreadableSample, match=r"vae-sd.zip was replaced after this run opened it"):
        next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)))


@pytest.mark.slow
def test_benchmark_quick_mode(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.data_loader", "--work", str(tmp_path), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    startup = figures["startup"]
    assert startup["before"]["items"] == startup["after"]["items"] == 2000
    for key in ("start-up s", "first batch s", "PSS MB"):
        assert startup["before"][key] > 0 and startup["after"][key] > 0
    assert "after/before" in done.stdout and "decoding cores" in done.stdout
