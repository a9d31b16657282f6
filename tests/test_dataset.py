"""CustomDataset: the REG/REPA layouts, folder and zip, pairing by name, labels, and every start-up /
read-time error."""
from __future__ import annotations

import json
import os
import zipfile

import PIL.Image
import numpy as np
import pytest
import torch

from dataset import CustomDataset
from helpers import make_data, zip_folder
from reg.utils import UserError  # a data folder's mistakes print as one line from every entry point


def test_items_match_files(tmp_path):
    images, moments, labels = make_data(tmp_path, n=5, res=32)
    ds = CustomDataset(str(tmp_path), resolution=32, num_classes=10)
    assert len(ds) == 5 and ds.latent_channels == 4
    assert ds.vae_info["latent_channels"] == 4 and ds.vae_info["scaling_factor"] == 0.18215  # SD defaults
    for i in range(5):
        image, mom, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert mom.dtype == torch.float32 and mom.shape == (8, 4, 4)
        assert label.dtype == torch.int64 and label.shape == ()
        assert torch.equal(image, torch.from_numpy(images[i]).permute(2, 0, 1))
        assert torch.equal(mom, torch.from_numpy(moments[i]))
        assert int(label) == labels[i]


def test_vae_entry_sets_channels(tmp_path):
    vae = {"name": "pixel-unshuffle", "latent_channels": 192, "scaling_factor": 1.0, "resolution": 32}
    make_data(tmp_path, n=2, res=32, channels=192, vae=vae)
    ds = CustomDataset(str(tmp_path), resolution=32, num_classes=10)
    assert ds.latent_channels == 192 and ds.vae_info["scaling_factor"] == 1.0
    assert ds[1][1].shape == (384, 4, 4)
    with pytest.raises(ValueError, match="resolution 32"):
        CustomDataset(str(tmp_path), resolution=64, num_classes=10)


@pytest.mark.parametrize("prefix", ["", "top"])
def test_zip_matches_folder(tmp_path, prefix):
    make_data(tmp_path / "dir", n=7, res=32)
    os.makedirs(tmp_path / "zip")
    for base in ("imagenet_32_vae", "vae-sd"):
        # prefix "top": zipped as `zip -r vae-sd.zip vae-sd`, everything under "vae-sd/"
        zip_folder(tmp_path / "dir" / base, tmp_path / "zip" / f"{base}.zip", f"{base}/" if prefix else "")
    ref = CustomDataset(str(tmp_path / "dir"), resolution=32, num_classes=10)
    ds = CustomDataset(str(tmp_path / "zip"), resolution=32, num_classes=10)
    assert ds.images.is_zip and ds.latents.is_zip and len(ds) == 7
    # Two forked workers: each must open its own zip handle.
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    got = [torch.cat(t) for t in zip(*[(x, m, y) for x, m, y in loader])]
    want = [torch.stack([ref[i][k] for i in range(len(ref))]) for k in range(3)]
    for g, w in zip(got, want):
        assert torch.equal(g.reshape(w.shape), w)


def test_missing_folder(tmp_path):
    make_data(tmp_path, n=2, res=32)
    with pytest.raises(FileNotFoundError, match="imagenet_64_vae"):
        CustomDataset(str(tmp_path), resolution=64)
    os.rename(tmp_path / "vae-sd", tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=r"vae-sd.*vae-sd\.zip"):
        CustomDataset(str(tmp_path), resolution=32)


def test_count_mismatch_gives_both_counts(tmp_path):
    make_data(tmp_path, n=4, res=32)
    os.remove(tmp_path / "imagenet_32_vae" / "00000" / "img00000002.png")
    with pytest.raises(UserError, match=r"3 images.*4 \.npy"):
        CustomDataset(str(tmp_path), resolution=32, num_classes=10)


def test_latent_without_label_is_named(tmp_path):
    make_data(tmp_path, n=4, res=32)
    path = tmp_path / "vae-sd" / "dataset.json"
    meta = json.loads(path.read_text())
    del meta["labels"][2]
    path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="00000/img-mean-std-00000002.npy"):
        CustomDataset(str(tmp_path), resolution=32, num_classes=10)


@pytest.mark.parametrize("bad", [10, -1])
def test_label_out_of_range(tmp_path, bad):
    make_data(tmp_path, n=3, res=32, labels=[0, bad, 9])
    with pytest.raises(UserError, match=rf"outside \[0, 10\).*img-mean-std-00000001.npy.*{bad}"):
        CustomDataset(str(tmp_path), resolution=32, num_classes=10)
    if bad > 0:  # fine once num_classes covers it
        assert len(CustomDataset(str(tmp_path), resolution=32, num_classes=1000)) == 3


def test_wrong_channel_count(tmp_path):
    make_data(tmp_path, n=3, res=32, channels=3)  # 6-channel moments, but no "vae" entry => SD's 4 expected
    with pytest.raises(UserError, match=r"shape \(6, 4, 4\), expected \(8, 4, 4\)"):
        CustomDataset(str(tmp_path), resolution=32, num_classes=10)
    with pytest.raises(ValueError, match="latent_channels=16"):
        CustomDataset(str(tmp_path), resolution=32, num_classes=10, latent_channels=16)


def test_wrong_channel_count_later_file_is_named(tmp_path):
    make_data(tmp_path, n=3, res=32)
    np.save(tmp_path / "vae-sd" / "00000" / "img-mean-std-00000002.npy", np.zeros((6, 4, 4), np.float32))
    ds = CustomDataset(str(tmp_path), resolution=32, num_classes=10)  # start-up reads the first header only
    with pytest.raises(ValueError, match="img-mean-std-00000002.npy has shape"):
        ds[2]


def test_corrupt_files_are_named(tmp_path):
    make_data(tmp_path, n=3, res=32)
    (tmp_path / "imagenet_32_vae" / "00000" / "img00000001.png").write_bytes(b"not a png")
    (tmp_path / "vae-sd" / "00000" / "img-mean-std-00000002.npy").write_bytes(b"\x93NUMPY garbage")
    ds = CustomDataset(str(tmp_path), resolution=32, num_classes=10)
    ds[0]
    with pytest.raises(RuntimeError, match="img00000001.png"):
        ds[1]
    with pytest.raises(RuntimeError, match="img-mean-std-00000002.npy"):
        ds[2]


def test_layouts_reg_256_name_at_other_resolutions_and_repa(tmp_path, caplog):
    make_data(tmp_path / "ours", n=3, res=32)
    ds = CustomDataset(str(tmp_path / "ours"), resolution=32, num_classes=10)
    assert "REG layout: imagenet_32_vae" in ds.layout
    ref = [ds[i] for i in range(3)]
    # REG's dataset.py reads imagenet_256_vae whatever the resolution (its 512 px runs included)
    os.rename(tmp_path / "ours" / "imagenet_32_vae", tmp_path / "ours" / "imagenet_256_vae")
    with caplog.at_level("INFO", logger="dataset"):
        ds = CustomDataset(str(tmp_path / "ours"), resolution=32, num_classes=10)
    assert "imagenet_256_vae" in ds.layout and "REG" in ds.layout and ds.layout in caplog.text
    assert all(torch.equal(a, b) for i in range(3) for a, b in zip(ds[i], ref[i]))
    # REPA: images/ + vae-sd/
    os.rename(tmp_path / "ours" / "imagenet_256_vae", tmp_path / "ours" / "images")
    ds = CustomDataset(str(tmp_path / "ours"), resolution=32, num_classes=10)
    assert ds.layout.startswith("REPA layout: images")
    assert all(torch.equal(a, b) for i in range(3) for a, b in zip(ds[i], ref[i]))
    # both candidate folders and no imagenet_32_vae: ambiguous, refused (never mix data silently)
    os.makedirs(tmp_path / "ours" / "imagenet_256_vae")
    with pytest.raises(ValueError, match="both imagenet_256_vae and images"):
        CustomDataset(str(tmp_path / "ours"), resolution=32, num_classes=10)
    # the exact-resolution folder wins over the others
    os.rename(tmp_path / "ours" / "images", tmp_path / "ours" / "imagenet_32_vae")
    assert "imagenet_32_vae" in CustomDataset(str(tmp_path / "ours"), resolution=32, num_classes=10).layout


def test_pairs_by_name_not_position(tmp_path):
    images, moments, _ = make_data(tmp_path, n=6, res=32)
    # one image and another latent missing: the counts still agree (5 and 5), so pairing by sorted
    # position would silently shift items 2..4 by one
    os.remove(tmp_path / "imagenet_32_vae" / "00000" / "img00000002.png")
    os.remove(tmp_path / "vae-sd" / "00000" / "img-mean-std-00000004.npy")
    with pytest.raises(ValueError) as e:
        CustomDataset(str(tmp_path), resolution=32, num_classes=10)
    msg = str(e.value)
    assert "img-mean-std-00000002.npy" in msg and "without an image" in msg
    assert "img00000004.png" in msg and "without a latent" in msg


def test_pairing_follows_indices_across_folders(tmp_path):
    images, moments, labels = make_data(tmp_path, n=3, res=32)
    # the image of item 1 sits in another shard folder: still paired with latent 1
    os.makedirs(tmp_path / "imagenet_32_vae" / "00009")
    os.rename(tmp_path / "imagenet_32_vae" / "00000" / "img00000001.png",
              tmp_path / "imagenet_32_vae" / "00009" / "img00000001.png")
    ds = CustomDataset(str(tmp_path), resolution=32, num_classes=10)
    for i in range(3):
        assert torch.equal(ds[i][0], torch.from_numpy(images[i]).permute(2, 0, 1))
        assert torch.equal(ds[i][1], torch.from_numpy(moments[i]))
    (tmp_path / "imagenet_32_vae" / "00009" / "extra.png").write_bytes(b"")
    with pytest.raises(ValueError, match="extra.png does not follow the image naming"):
        CustomDataset(str(tmp_path), resolution=32, num_classes=10)


def test_unlabelled_dataset_needs_num_classes_1(tmp_path):
    make_data(tmp_path, n=3, res=32, labels="null")
    with pytest.raises(ValueError, match="--num-classes 1"):
        CustomDataset(str(tmp_path), resolution=32, num_classes=10)
    ds = CustomDataset(str(tmp_path), resolution=32, num_classes=1)
    assert [int(ds[i][2]) for i in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("bad", [3.0, 3.7])
def test_float_labels_are_refused(tmp_path, bad):
    make_data(tmp_path, n=3, res=32, labels=[1, bad, 2])
    with pytest.raises(ValueError, match=rf"dataset.json.*img-mean-std-00000001.npy.*{bad}.*not an integer"):
        CustomDataset(str(tmp_path), resolution=32, num_classes=10)


def test_labels_for_missing_files_are_refused(tmp_path):
    make_data(tmp_path, n=4, res=32)
    os.remove(tmp_path / "imagenet_32_vae" / "00000" / "img00000003.png")
    os.remove(tmp_path / "vae-sd" / "00000" / "img-mean-std-00000003.npy")
    with pytest.raises(ValueError, match="img-mean-std-00000003.npy.*incomplete copy"):
        CustomDataset(str(tmp_path), resolution=32, num_classes=10)


def test_skip_bad_samples_replaces_deterministically(tmp_path, caplog):
    images, moments, labels = make_data(tmp_path, n=4, res=32)
    (tmp_path / "imagenet_32_vae" / "00000" / "img00000001.png").write_bytes(b"not a png")
    (tmp_path / "vae-sd" / "00000" / "img-mean-std-00000003.npy").write_bytes(b"\x93NUMPY garbage")
    strict = CustomDataset(str(tmp_path), resolution=32, num_classes=10)
    assert len(strict[0]) == 3
    with pytest.raises(RuntimeError, match="img00000001.png"):
        strict[1]
    ds = CustomDataset(str(tmp_path), resolution=32, num_classes=10, skip_bad_samples=True)
    with caplog.at_level("WARNING", logger="dataset"):
        items = [ds[i] for i in range(4)] + [ds[1]]
    assert [bool(it[3]) for it in items] == [False, True, False, True, True]
    # item 1 -> item 2 (the next readable); item 3 (the last) wraps round to item 0
    for got, want in ((items[1], 2), (items[3], 0), (items[4], 2)):
        assert torch.equal(got[0], torch.from_numpy(images[want]).permute(2, 0, 1))
        assert torch.equal(got[1], torch.from_numpy(moments[want])) and int(got[2]) == labels[want]
    bad_logs = [r for r in caplog.records if "bad sample" in r.getMessage()]
    assert len(bad_logs) == 2  # once per bad file, not once per read
    assert "img00000001.png" in bad_logs[0].getMessage() and "img-mean-std-00000003.npy" in bad_logs[1].getMessage()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert len(batch) == 4 and batch[3].dtype == torch.bool and int(batch[3].sum()) == 2
