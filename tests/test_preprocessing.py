"""preprocessing/: ADM crop, convert, encode (exact moments, batch invariance, resume), synthetic data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from dataset import CustomDataset
from preprocessing import dataset_tools as dt
from fixtures import save_tiny_vae
from preprocessing.synthetic import COLOURS, render, write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return save_tiny_vae(str(tmp_path_factory.mktemp("vae") / "tiny-vae"), seed=0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """20 synthetic 48px images -> convert -> DATA/imagenet_32_vae (the layout encode reads)."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(str(root / "raw"), num_images=20, resolution=48, num_classes=5, seed=0)
    dt.main(dt.parse_args(["convert", "--source", str(root / "raw"), "--dest", str(root / "DATA" / "imagenet_32_vae"),
                           "--resolution", "32x32", "--transform", "center-crop-dhariwal", "--num-workers", "0"]))
    return root / "DATA"


def run_encode(src, dest, vae, *extra):
    return dt.main(dt.parse_args(["encode", "--source", str(src), "--dest", str(dest), "--model-url", str(vae),
                                  "--num-workers", "0", "--cpu", *extra]))


def load_moments(folder) -> dict[str, np.ndarray]:
    return {n: np.load(os.path.join(folder, n)) for n in dt.FileTree(str(folder)).list() if n.endswith(".npy")}


# ---------------------------------------------------------------------------------------------- crop

def test_dhariwal_crop_against_hand_computation():
    rng = np.random.default_rng(0)
    src = PIL.Image.fromarray(rng.integers(0, 256, (301, 517, 3), dtype=np.uint8))  # W=517, H=301
    # By hand for res 64: short side 301 >= 128 -> BOX-halve to 258x150; 150 >= 128 -> 129x75;
    # 75 < 128 -> BICUBIC by 64/75: (round(110.08), 64) = (110, 64); crop x from (110-64)//2 = 23.
    step = src.resize((258, 150), PIL.Image.Resampling.BOX).resize((129, 75), PIL.Image.Resampling.BOX)
    step = step.resize((110, 64), PIL.Image.Resampling.BICUBIC)
    want = np.asarray(step)[0:64, 23:87]
    got = np.asarray(dt.center_crop_dhariwal(src, 64))
    assert got.shape == (64, 64, 3) and np.array_equal(got, want)
    # portrait, no halving (short side 100 < 2*64): BICUBIC to (64, round(64*160/100)=102), crop y from 19
    tall = PIL.Image.fromarray(rng.integers(0, 256, (160, 100, 3), dtype=np.uint8))
    want = np.asarray(tall.resize((64, 102), PIL.Image.Resampling.BICUBIC))[19:83, 0:64]
    assert np.array_equal(np.asarray(dt.center_crop_dhariwal(tall, 64)), want)
    # already at the resolution: untouched
    square = PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(dt.center_crop_dhariwal(square, 64)), np.asarray(square))


def test_parse_resolution():
    assert dt.parse_resolution("256x256") == dt.parse_resolution("256,256") == dt.parse_resolution("256") == (256, 256)
    assert dt.parse_resolution("512x256") == (512, 256)  # EDM2's WxH, e.g. for center-crop-wide
    for bad in ("abc", "0x0", "256x"):
        with pytest.raises(Exception, match="cannot parse|positive"):
            dt.parse_resolution(bad)


# ---------------------------------------------------------------------------------------------- convert

def make_imagenet_folder(root) -> dict[str, int]:
    """Three class folders, odd sizes and modes, one broken file. Returns {relative name: class}."""
    rng = np.random.default_rng(1)
    expected = {}
    for cls, synset in enumerate(["n01", "n02", "n03"]):  # class = index of the sorted top-level folder
        os.makedirs(root / synset)
        for j, (w, h, mode) in enumerate([(70, 50, "RGB"), (40, 90, "L"), (64, 64, "RGBA")]):
            arr = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
            img = PIL.Image.fromarray(arr).convert(mode)
            name = f"{synset}/{synset}_{j}.{'JPEG' if j == 0 else 'png'}"
            img.save(root / name)
            expected[name] = cls
    (root / "n02" / "n02_broken.JPEG").write_bytes(b"\xff\xd8 truncated")
    return expected


def test_convert_folder_labels_and_skips(tmp_path, capsys):
    expected = make_imagenet_folder(tmp_path / "src")
    assert sorted(expected.values()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    out = dt.main(dt.parse_args(["convert", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "out"),
                                 "--resolution", "32x32", "--transform", "center-crop-dhariwal", "--num-workers", "2"]))
    assert out["written"] == 9 and len(out["skipped"]) == 1 and "n02_broken.JPEG" in out["skipped"][0]
    captured = capsys.readouterr()
    assert "skipped 1" in captured.out and "n02_broken.JPEG" in captured.err
    labels = json.loads((tmp_path / "out" / "dataset.json").read_text())["labels"]
    # sorted sources: n01_0..2, n02_0..2, n02_broken (index 6, skipped), n03_0..2
    assert [n for n, _ in labels] == [dt.image_name(i) for i in (0, 1, 2, 3, 4, 5, 7, 8, 9)]
    assert [c for _, c in labels] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for name, _ in labels:
        img = PIL.Image.open(tmp_path / "out" / name)
        assert img.size == (32, 32) and img.mode == "RGB"
    # the crop is the ADM one, applied to the RGB-converted source
    src = PIL.Image.open(tmp_path / "src" / "n03" / "n03_1.png").convert("RGB")
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "out" / dt.image_name(8))),
                          np.asarray(dt.center_crop_dhariwal(src, 32)))
    with pytest.raises(FileExistsError, match="not empty"):
        dt.main(dt.parse_args(["convert", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "out")]))


def test_convert_zip_to_zip_matches_folder(tmp_path):
    make_imagenet_folder(tmp_path / "src")
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as z:
        for dirpath, _dirs, files in os.walk(tmp_path / "src"):
            for f in files:
                z.write(os.path.join(dirpath, f), os.path.relpath(os.path.join(dirpath, f), tmp_path / "src"))
    common = ["--resolution", "32", "--num-workers", "0", "--max-images", "5"]
    dt.main(dt.parse_args(["convert", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "a"), *common]))
    dt.main(dt.parse_args(["convert", "--source", str(tmp_path / "src.zip"), "--dest", str(tmp_path / "b.zip"), *common]))
    with zipfile.ZipFile(tmp_path / "b.zip") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        assert json.loads(z.read("dataset.json")) == json.loads((tmp_path / "a" / "dataset.json").read_text())
        for name, _ in json.loads(z.read("dataset.json"))["labels"]:
            assert z.read(name) == (tmp_path / "a" / name).read_bytes()


# ---------------------------------------------------------------------------------------------- encode

def test_round_trip_exact_moments(converted, tiny_vae_dir, tmp_path):
    out = run_encode(converted / "imagenet_32_vae", converted / "vae-sd", tiny_vae_dir, "--batch-size", "8")
    assert out["written"] == 20
    ds = CustomDataset(str(converted), resolution=32, num_classes=5)
    assert len(ds) == 20 and ds.latent_channels == 4
    assert ds.vae_info == {"name": os.path.abspath(tiny_vae_dir), "latent_channels": 4,
                           "scaling_factor": 0.18215, "resolution": 32}
    src_labels = json.loads((converted / "imagenet_32_vae" / "dataset.json").read_text())["labels"]
    images = torch.stack([ds[i][0] for i in range(20)])
    moments = torch.stack([ds[i][1] for i in range(20)])
    assert [int(ds[i][2]) for i in range(20)] == [c for _, c in src_labels]
    assert torch.equal(images[3], torch.from_numpy(np.array(PIL.Image.open(
        converted / "imagenet_32_vae" / src_labels[3][0]))).permute(2, 0, 1))
    # the moments are exactly what the VAE gives for those images (x/127.5 - 1, REG's encode_pixels)
    from diffusers import AutoencoderKL
    raw = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    with torch.no_grad():
        post = raw.encode(images.float() / 127.5 - 1).latent_dist
    assert (moments[:, :4] - post.mean).abs().max() <= 1e-5
    assert (moments[:, 4:] - post.std).abs().max() <= 1e-5

    # batch size 1 gives the same moments as batch size 8, within 1e-5
    run_encode(converted / "imagenet_32_vae", tmp_path / "bs1", tiny_vae_dir, "--batch-size", "1", "--max-images", "6")
    bs1, bs8 = load_moments(tmp_path / "bs1"), load_moments(converted / "vae-sd")
    assert len(bs1) == 6
    assert max(np.abs(bs1[n] - bs8[n]).max() for n in bs1) <= 1e-5


def test_encode_resume_skips_finished_shards(converted, tmp_path):
    src, dest = converted / "imagenet_32_vae", tmp_path / "vae-sd"
    out = run_encode(src, dest, "pixel-unshuffle", "--shard-size", "8", "--batch-size", "5")
    assert out["written"] == 20 and out["already_done"] == 0
    full = load_moments(dest)
    # Simulate a run killed inside shard 1 (images 8..15): two of its files and dataset.json missing,
    # a stale temporary left. Mark a file of finished shard 0 so we can see it is not rewritten.
    os.remove(dest / "dataset.json")
    for i in (9, 14):
        os.remove(dest / "00000" / f"img-mean-std-{i:08d}.npy")
    (dest / "00000" / ".img-mean-std-00000009.npy.x1y2.tmp").write_bytes(b"partial")  # utils.atomic_write's name
    marker = dest / "00000" / "img-mean-std-00000002.npy"
    np.save(marker, np.full_like(full["00000/img-mean-std-00000002.npy"], 7.0))

    out = run_encode(src, dest, "pixel-unshuffle", "--shard-size", "8", "--batch-size", "5")
    assert out["written"] == 8 and out["already_done"] == 12  # only shard 1 was redone
    again = load_moments(dest)
    assert np.all(again["00000/img-mean-std-00000002.npy"] == 7.0)  # shard 0 untouched
    for n in full:
        if n != "00000/img-mean-std-00000002.npy":
            assert np.array_equal(again[n], full[n])
    assert not [n for n in os.listdir(dest / "00000") if ".tmp" in n]
    assert len(json.loads((dest / "dataset.json").read_text())["labels"]) == 20
    # a resume with another VAE is refused instead of mixing latent spaces
    with pytest.raises(ValueError, match="made with"):
        run_encode(src, dest, "pixel-unshuffle", "--dtype", "bf16")


def test_latent_names_and_shards():
    # convert's names keep their index (gaps from skipped files stay paired); others are numbered
    assert dt.latent_names_for(["00000/img00000000.png", "00000/img00000002.png"]) == \
        ["00000/img-mean-std-00000000.npy", "00000/img-mean-std-00000002.npy"]
    assert dt.latent_names_for(["b.png", "c.png"]) == ["00000/img-mean-std-00000000.npy", "00000/img-mean-std-00000001.npy"]
    shards = [dt.shards_for_rank(23, 5, r, 3) for r in range(3)]
    covered = sorted(i for rank in shards for s in rank for i in s)
    assert covered == list(range(23)) and [len(s) for s in shards] == [2, 2, 1]


def test_cli_entry_points(converted, tmp_path):
    """`python preprocessing/dataset_tools.py encode` (script form) with the weight-free codec."""
    src = converted / "imagenet_32_vae"
    r = subprocess.run([sys.executable, "preprocessing/dataset_tools.py", "encode", "--source", str(src),
                        "--dest", str(tmp_path / "DATA" / "vae-sd"), "--model-url", "pixel-unshuffle",
                        "--num-workers", "0", "--cpu", "--max-images", "4"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 4 latent files" in r.stdout
    meta = json.loads((tmp_path / "DATA" / "vae-sd" / "dataset.json").read_text())
    assert meta["vae"] == {"name": "pixel-unshuffle", "latent_channels": 192, "scaling_factor": 1.0, "resolution": 32}
    m = np.load(tmp_path / "DATA" / "vae-sd" / meta["labels"][0][0])
    img = np.asarray(PIL.Image.open(src / dt.image_name(0)))
    assert m.shape == (384, 4, 4) and m[0, 0, 0] == np.float32(img[0, 0, 0] / 127.5 - 1)


# ---------------------------------------------------------------------------------------------- synthetic

def test_synthetic_dataset(tmp_path):
    n = write_dataset(str(tmp_path / "syn"), num_images=24, resolution=32, num_classes=6, seed=3)
    meta = json.loads((tmp_path / "syn" / "dataset.json").read_text())
    labels = [c for _, c in meta["labels"]]
    assert n == 24 and sorted(labels) == sorted(list(range(6)) * 4)  # balanced
    assert meta["class_names"][:2] == ["red circle", "green square"]
    for name, cls in meta["labels"]:
        img = np.asarray(PIL.Image.open(tmp_path / "syn" / name)).astype(float)
        assert img.shape == (32, 32, 3)
        fg = img[np.abs(img - img[0, 0]).sum(-1) > 120]  # the shape's pixels, away from the background
        assert len(fg) > 0.1 * 32 * 32  # big and bold
        want = np.array(list(COLOURS.values())[cls % len(COLOURS)])
        assert np.abs(np.median(fg, axis=0) - want).max() < 50, (name, cls)
    # deterministic given the seed
    a = render(3, 32, np.random.default_rng(0))
    b = render(3, 32, np.random.default_rng(0))
    assert np.array_equal(np.asarray(a), np.asarray(b))
