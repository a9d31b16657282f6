"""preprocessing/: ADM crop, convert, encode (exact moments, batch invariance, resume), synthetic data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import PIL.Image
import numpy as np
import pytest
import torch

from dataset import CustomDataset
from preprocessing import dataset_tools as dt
from preprocessing import transforms
from preprocessing.synthetic import COLOURS, render, write_dataset
from reg.utils import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    got = np.asarray(transforms.center_crop_dhariwal(src, 64))
    assert got.shape == (64, 64, 3) and np.array_equal(got, want)
    # portrait, no halving (short side 100 < 2*64): BICUBIC to (64, round(64*160/100)=102), crop y from 19
    tall = PIL.Image.fromarray(rng.integers(0, 256, (160, 100, 3), dtype=np.uint8))
    want = np.asarray(tall.resize((64, 102), PIL.Image.Resampling.BICUBIC))[19:83, 0:64]
    assert np.array_equal(np.asarray(transforms.center_crop_dhariwal(tall, 64)), want)
    # already at the resolution: untouched
    square = PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(transforms.center_crop_dhariwal(square, 64)), np.asarray(square))


def test_parse_resolution():
    for text in ("256x256", "256,256", "256"):
        assert transforms.parse_resolution(text) == (256, 256)
    assert transforms.parse_resolution("512x256") == (512, 256)  # EDM2's WxH, e.g. for center-crop-wide
    for bad in ("abc", "0x0", "256x"):
        with pytest.raises(Exception, match="cannot parse|positive"):
            transforms.parse_resolution(bad)


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
                          np.asarray(transforms.center_crop_dhariwal(src, 32)))
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


def test_convert_refuses_a_source_zip_with_two_members_of_one_name(tmp_path):
    make_imagenet_folder(tmp_path / "src")
    first, second = sorted((tmp_path / "src" / "n01").iterdir())[:2]
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        for path in sorted(p for p in (tmp_path / "src").rglob("*") if p.is_file()):
            z.write(path, path.relative_to(tmp_path / "src").as_posix())
        z.write(second, first.relative_to(tmp_path / "src").as_posix())  # another image under the first's name
    with pytest.raises(UserError, match=rf"src.zip holds two members named 'n01/{first.name}'"):
        dt.main(dt.parse_args(["convert", "--source", str(tmp_path / "src.zip"), "--dest", str(tmp_path / "out"),
                               "--resolution", "32", "--num-workers", "0"]))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- encode

def test_round_trip_exact_moments(converted, tiny_vae_dir, tmp_path):
    out = run_encode(converted / "imagenet_32_vae", converted / "vae-sd", tiny_vae_dir, "--batch-size", "8")
    assert out["written"] == 20
    ds = CustomDataset(str(converted), resolution=32, num_classes=5)
    assert len(ds) == 20 and ds.latent_channels == 4
    # the VAE folder by a relative path (to the working directory), never this machine's absolute one
    assert ds.vae_info == {"name": os.path.relpath(tiny_vae_dir), "latent_channels": 4,
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
    # a stale temporary left. A file of finished shard 0 is watched: it must not be rewritten (same inode and
    # mtime; overwriting it would be refused, tests/test_encode_content.py).
    os.remove(dest / "dataset.json")
    for i in (9, 14):
        os.remove(dest / "00000" / f"img-mean-std-{i:08d}.npy")
    (dest / "00000" / ".img-mean-std-00000009.npy.x1y2.tmp").write_bytes(b"partial")  # utils.atomic_write's name
    marker = dest / "00000" / "img-mean-std-00000002.npy"
    os.utime(marker, ns=(1, 1))  # an mtime no rewrite can give it
    stamp = (marker.stat().st_ino, marker.stat().st_mtime_ns)

    out = run_encode(src, dest, "pixel-unshuffle", "--shard-size", "8", "--batch-size", "5")
    assert out["written"] == 8 and out["already_done"] == 12  # only shard 1 was redone
    again = load_moments(dest)
    assert (marker.stat().st_ino, marker.stat().st_mtime_ns) == stamp  # shard 0 untouched
    for n in full:
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


# ---------------------------------------------------------------------------------------------- EDM2 flags

def test_original_command_lines_parse_with_their_meaning():
    # REG preprocessing/dataset_prepare_convert.sh / _encode.sh and REPA's preprocessing README
    a = dt.parse_args(["convert", "--source=/in/train", "--dest=/out/imagenet_256_vae", "--resolution=256x256",
                       "--transform=center-crop-dhariwal"])
    assert (a.source, a.dest, a.resolution, a.transform, a.max_images) == (
        "/in/train", "/out/imagenet_256_vae", (256, 256), "center-crop-dhariwal", None)
    a = dt.parse_args(["convert", "--source=x.zip", "--dest=y.zip", "--resolution=512,256",
                       "--transform=center-crop-wide", "--max-images=10"])
    assert (a.resolution, a.transform, a.max_images) == ((512, 256), "center-crop-wide", 10)
    a = dt.parse_args(["convert", "--source=x", "--dest=y"])  # EDM2's defaults: no transform, keep the size
    assert a.transform is None and a.resolution is None
    a = dt.parse_args(["encode", "--source=/out/imagenet_256_vae", "--dest=/out/vae-sd"])
    assert a.model_url == "stabilityai/sd-vae-ft-mse" and a.max_images is None  # EDM2's default VAE
    a = dt.parse_args(["encode", "--model-url=stabilityai/sd-vae-ft-ema", "--source=s", "--dest=d", "--max-images=5"])
    assert (a.model_url, a.max_images) == ("stabilityai/sd-vae-ft-ema", 5)
    for argv, msg in ((["--transform=center-crop"], "needs --resolution"),
                      (["--transform=center-crop-dhariwal", "--resolution=512x256"], "square")):
        with pytest.raises(SystemExit):
            dt.parse_args(["convert", "--source=x", "--dest=y", *argv])


def test_edm_transforms_by_hand():
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)  # H=90, W=120
    src = PIL.Image.fromarray(arr)
    # center-crop-wide 64x32: ch = round(64 * 90 / 120) = 48 rows from (90-48)//2 = 21, LANCZOS to 64x32,
    # pasted at rows (64-32)//2 = 16 of a black 64x64 canvas
    band = np.asarray(PIL.Image.fromarray(arr[21:69]).resize((64, 32), PIL.Image.Resampling.LANCZOS))
    want = np.zeros((64, 64, 3), np.uint8)
    want[16:48] = band
    got = transforms.make_transform("center-crop-wide", (64, 32))(src)
    assert np.array_equal(np.asarray(got), want)
    assert transforms.make_transform("center-crop-wide", (128, 64))(src) is None  # narrower than 128: skipped, as EDM2
    assert transforms.make_transform("center-crop-wide", (120, 100))(src) is None  # band of 90 rows < 100
    # center-crop: the centred 90x90 square from column 15, LANCZOS to 32x32
    want = np.asarray(PIL.Image.fromarray(arr[:, 15:105]).resize((32, 32), PIL.Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(transforms.make_transform("center-crop", (32, 32))(src)), want)
    # no transform: LANCZOS resize to --resolution (aspect not kept), or untouched without it
    want = np.asarray(src.resize((32, 32), PIL.Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(transforms.make_transform(None, (32, 32))(src)), want)
    assert transforms.make_transform(None, None)(src) is src


def test_convert_sizes_must_agree_without_resolution(tmp_path):
    make_imagenet_folder(tmp_path / "src")  # mixed sizes
    with pytest.raises(ValueError, match="set --resolution"):
        dt.main(dt.parse_args(["convert", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "out"),
                               "--num-workers", "0"]))


def test_convert_center_crop_wide_skips_small_images(tmp_path, capsys):
    make_imagenet_folder(tmp_path / "src")  # widths 70, 40, 64 per class
    out = dt.main(dt.parse_args(["convert", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "out"),
                                 "--resolution", "64x32", "--transform", "center-crop-wide", "--num-workers", "0"]))
    # kept: the 70x50 (band round(64*50/70)=46 >= 32) and 64x64 images of each class; 40 px wide ones skipped
    assert out["written"] == 6 and sum("too small" in s for s in out["skipped"]) == 3
    labels = json.loads((tmp_path / "out" / "dataset.json").read_text())["labels"]
    assert [c for _, c in labels] == [0, 0, 1, 1, 2, 2]
    assert PIL.Image.open(tmp_path / "out" / labels[0][0]).size == (64, 64)


# ---------------------------------------------------------------------------------------------- integrity

def tree_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_encode_refuses_another_source_and_leaves_dest_identical(converted, tmp_path):
    dest = tmp_path / "vae-sd"
    run_encode(converted / "imagenet_32_vae", dest, "pixel-unshuffle", "--max-images", "8")
    other = tmp_path / "other"  # another dataset of the same size and naming
    write_dataset(str(other), num_images=8, resolution=32, num_classes=3, seed=9)
    before = tree_bytes(dest)
    with pytest.raises(ValueError, match=r"made from .*imagenet_32_vae.*not from --source .*other"):
        run_encode(other, dest, "pixel-unshuffle")
    assert tree_bytes(dest) == before
    config = json.loads((dest / dt.ENCODE_CONFIG).read_text())
    assert config["source"]["path"] == str(converted / "imagenet_32_vae") and len(config["source"]["fingerprint"]) == 64
    # the same source again: nothing to do, and nothing changes
    out = run_encode(converted / "imagenet_32_vae", dest, "pixel-unshuffle", "--max-images", "8")
    assert (out["written"], out["already_done"]) == (0, 8) and tree_bytes(dest) == before
    # latents of unknown origin (e.g. written by another tool) are not resumed into either
    foreign = tmp_path / "foreign"
    (foreign / "00000").mkdir(parents=True)
    np.save(foreign / "00000" / "img-mean-std-00000000.npy", np.zeros((384, 4, 4), np.float32))
    with pytest.raises(FileExistsError, match=dt.ENCODE_CONFIG):
        run_encode(converted / "imagenet_32_vae", foreign, "pixel-unshuffle")


def test_encode_max_images_keeps_labels_for_every_latent(converted, tmp_path):
    dest = tmp_path / "DATA" / "vae-sd"
    os.makedirs(dest.parent)
    os.symlink(converted / "imagenet_32_vae", dest.parent / "imagenet_32_vae")
    run_encode(converted / "imagenet_32_vae", dest, "pixel-unshuffle", "--shard-size", "4")
    out = run_encode(converted / "imagenet_32_vae", dest, "pixel-unshuffle", "--shard-size", "4", "--max-images", "6")
    assert out["written"] == 0
    labels = json.loads((dest / "dataset.json").read_text())["labels"]
    assert len(labels) == 20  # still one label per latent in the destination
    assert len(CustomDataset(str(dest.parent), resolution=32, num_classes=5)) == 20


def test_encode_without_labels_writes_an_unlabelled_dataset(converted, tmp_path, capsys):
    src = tmp_path / "DATA" / "imagenet_32_vae"  # convert's shard folders (00000/), no dataset.json
    shutil.copytree(converted / "imagenet_32_vae", src)
    os.remove(src / "dataset.json")
    run_encode(src, tmp_path / "DATA" / "vae-sd", "pixel-unshuffle")
    assert "unlabelled" in capsys.readouterr().err
    assert json.loads((tmp_path / "DATA" / "vae-sd" / "dataset.json").read_text())["labels"] is None
    with pytest.raises(ValueError, match="--num-classes 1"):
        CustomDataset(str(tmp_path / "DATA"), resolution=32, num_classes=1000)
    assert len(CustomDataset(str(tmp_path / "DATA"), resolution=32, num_classes=1)) == 20


def test_labels_from_class_folders_only():
    tree = type("T", (), {"exists": lambda self, n: False})()
    assert dt.source_labels(tree, ["00000/img00000000.png", "00001/img00001000.png"]) is None  # shards
    assert dt.source_labels(tree, ["cat/a.png", "dog/b.png", "cat/c.png"]) == {"cat/a.png": 0, "dog/b.png": 1,
                                                                              "cat/c.png": 0}
    assert dt.source_labels(tree, ["a.png", "dog/b.png"]) is None  # not every image in a class folder


@pytest.mark.parametrize("bad", [3.0, 3.7])
def test_float_labels_in_source_are_refused(tmp_path, bad):
    write_dataset(str(tmp_path / "src"), num_images=3, resolution=32, num_classes=3, seed=0)
    meta = json.loads((tmp_path / "src" / "dataset.json").read_text())
    meta["labels"][1][1] = bad
    (tmp_path / "src" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"src/dataset.json.*img00000001.png.*{bad}.*not an integer"):
        dt.main(dt.parse_args(["convert", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "out"),
                               "--num-workers", "0"]))


def test_convert_with_nothing_readable_fails(tmp_path):
    os.makedirs(tmp_path / "src" / "a")
    os.makedirs(tmp_path / "src" / "b")
    for name in ("a/x.png", "b/y.JPEG"):
        (tmp_path / "src" / name).write_bytes(b"not an image")
    r = subprocess.run([sys.executable, "preprocessing/dataset_tools.py", "convert", "--source", str(tmp_path / "src"),
                        "--dest", str(tmp_path / "out.zip"), "--resolution", "32x32", "--num-workers", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "no image" in r.stderr and "x.png" in r.stderr and "y.JPEG" in r.stderr
    assert os.listdir(tmp_path) == ["src"]  # no zip, and no temporary left behind


def test_script_and_module_entry_points(converted, tmp_path, monkeypatch):
    """The original command line `python dataset_tools.py ...` inside preprocessing/, and -m. (The root form
    `python preprocessing/dataset_tools.py` runs in test_convert_with_nothing_readable_fails and in demo.sh.)"""
    src = converted / "imagenet_32_vae"
    runs = [(["dataset_tools.py"], os.path.join(REPO, "preprocessing")),
            (["-m", "preprocessing.dataset_tools"], REPO)]
    for k, (entry, cwd) in enumerate(runs):
        r = subprocess.run([sys.executable, *entry, "convert", f"--source={src}", f"--dest={tmp_path / str(k)}",
                            "--max-images=2", "--num-workers=0"], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(tmp_path / str(k))) == ["00000", "dataset.json"]
    # importing the module (its code run afresh, as a new module) changes nothing in sys.path, even when the
    # repository root is not on it (its imports are already loaded here)
    import importlib.util
    spec = importlib.util.spec_from_file_location("fresh_dataset_tools", os.path.join(REPO, "preprocessing",
                                                                                     "dataset_tools.py"))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.abspath(REPO)])
    before = list(sys.path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert sys.path == before


def test_encode_into_zip(converted, tmp_path):
    data = tmp_path / "DATA"
    os.makedirs(data)
    os.symlink(converted / "imagenet_32_vae", data / "imagenet_32_vae")
    run_encode(converted / "imagenet_32_vae", data / "vae-sd.zip", "pixel-unshuffle", "--max-images", "6")
    assert sorted(os.listdir(data)) == ["imagenet_32_vae", "vae-sd.zip"]  # the work folder is gone
    with zipfile.ZipFile(data / "vae-sd.zip") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    os.remove(data / "imagenet_32_vae")
    shutil.copytree(converted / "imagenet_32_vae", data / "imagenet_32_vae")
    for name in os.listdir(data / "imagenet_32_vae" / "00000"):  # keep the 6 encoded images only
        if int(name[3:11]) >= 6:
            os.remove(data / "imagenet_32_vae" / "00000" / name)
    ds = CustomDataset(str(data), resolution=32, num_classes=5)
    assert ds.latents.is_zip and len(ds) == 6 and ds[5][1].shape == (384, 4, 4)
    with pytest.raises(FileExistsError, match="already exists"):
        run_encode(converted / "imagenet_32_vae", data / "vae-sd.zip", "pixel-unshuffle")
