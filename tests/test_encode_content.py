"""Data whose content, not just its name, is checked (docs/data.md): encode's resume verifies every image's
hash and label, symlinked class folders keep their labels, every PIL mode converts to the right 8-bit RGB
(or is refused by name) in convert, encode and the dataset alike, and integer latent files are refused."""
from __future__ import annotations

import io
import json
import os
import shutil

import PIL.Image
import numpy as np
import pytest

from dataset import CustomDataset, FileTree, UnsupportedImageMode, decode_image
from preprocessing import dataset_tools as dt
from preprocessing.synthetic import write_dataset
from reg.utils import UserError


def run_encode(src, dest, *extra):
    return dt.main(dt.parse_args(["encode", "--source", str(src), "--dest", str(dest), "--model-url",
                                  "pixel-unshuffle", "--num-workers", "0", "--cpu", *extra]))


def tree_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- encode resume

def test_encode_refuses_a_source_with_the_same_names_and_sizes_but_other_content(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "vae-sd"
    write_dataset(str(src), num_images=12, resolution=32, num_classes=3, seed=0)
    run_encode(src, dest, "--max-images", "8", "--shard-size", "4")
    before = tree_bytes(dest)
    sizes = {n: os.path.getsize(src / n) for n in FileTree(str(src)).list()}
    labels = (src / "dataset.json").read_text()
    shutil.rmtree(src)
    write_dataset(str(src), num_images=12, resolution=32, num_classes=3, seed=1)  # another seed
    (src / "dataset.json").write_text(labels)  # even with the same labels
    assert {n: os.path.getsize(src / n) for n in FileTree(str(src)).list()} == sizes  # same names and sizes
    with pytest.raises(UserError, match=r"^--source .* is not what --dest .* was encoded from: .*src/00000/img0000000"
                                        r"\d.png has other content \(sha256 \w{12} now, \w{12} when encoded\)"):
        run_encode(src, dest, "--max-images", "12", "--shard-size", "4")
    assert tree_bytes(dest) == before  # nothing written, nothing removed


def test_encode_names_the_one_changed_image_and_a_changed_label(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "vae-sd"
    write_dataset(str(src), num_images=8, resolution=32, num_classes=3, seed=0)
    run_encode(src, dest, "--shard-size", "4")
    before = tree_bytes(dest)
    # one image changed in place, same size: flip one byte of the pixel data of image 6 (uncompressed PNG)
    path = src / "00000" / "img00000006.png"
    data = bytearray(path.read_bytes())
    data[200] ^= 1
    original = path.read_bytes()
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"img00000006.png has other content .*img-mean-std-00000006.npy"):
        run_encode(src, dest, "--shard-size", "4")
    path.write_bytes(original)
    # a changed label alone (same pixels)
    meta = json.loads((src / "dataset.json").read_text())
    meta["labels"][2][1] = (meta["labels"][2][1] + 1) % 3
    (src / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"img00000002.png has label \d now, \d when encoded"):
        run_encode(src, dest, "--shard-size", "4")
    assert tree_bytes(dest) == before


def test_encode_makes_again_the_latents_without_a_content_record(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "vae-sd"
    write_dataset(str(src), num_images=8, resolution=32, num_classes=3, seed=0)
    run_encode(src, dest, "--shard-size", "4")
    records = sorted(os.listdir(dest / dt.HASH_DIR))
    assert records == ["img-mean-std-00000000.json", "img-mean-std-00000004.json"]
    rows = json.loads((dest / dt.HASH_DIR / records[1]).read_text())["images"]
    assert rows[0][:2] == ["00000/img-mean-std-00000004.npy", "00000/img00000004.png"]
    assert rows[0][2] == dt.content_hash((src / "00000" / "img00000004.png").read_bytes())
    latents = tree_bytes(dest)
    os.remove(dest / dt.HASH_DIR / records[1])  # killed after the shard's latents, before its record
    out = run_encode(src, dest, "--shard-size", "4")
    assert (out["written"], out["already_done"]) == (4, 4)
    assert tree_bytes(dest) == latents
    # and the resumed destination is still read by the training dataset
    os.symlink(src, tmp_path / "imagenet_32_vae")
    assert len(CustomDataset(str(tmp_path), resolution=32, num_classes=3)) == 8


# ---------------------------------------------------------------------------------------------- class folders

def _class_source(root):
    """a/, b -> elsewhere/, c/ with two images each; their pixel values say their class."""
    for name, where in (("a", root / "a"), ("b", root.parent / "elsewhere"), ("c", root / "c")):
        where.mkdir(parents=True)
        for k in range(2):
            value = {"a": 10, "b": 20, "c": 30}[name]
            PIL.Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(where / f"{k}.png")
    os.symlink(root.parent / "elsewhere", root / "b")


def test_symlinked_class_folder_keeps_every_label(tmp_path):
    src = tmp_path / "raw" / "src"
    _class_source(src)
    assert FileTree(str(src)).list() == ["a/0.png", "a/1.png", "b/0.png", "b/1.png", "c/0.png", "c/1.png"]
    dt.main(dt.parse_args(["convert", "--source", str(src), "--dest", str(tmp_path / "out"), "--num-workers", "0"]))
    labels = json.loads((tmp_path / "out" / "dataset.json").read_text())["labels"]
    assert [c for _, c in labels] == [0, 0, 1, 1, 2, 2]
    pixels = [int(np.asarray(PIL.Image.open(tmp_path / "out" / n))[0, 0, 0]) for n, _ in labels]
    assert pixels == [10, 10, 20, 20, 30, 30]


def test_class_folders_that_would_shift_labels_are_refused(tmp_path):
    src = tmp_path / "raw" / "src"
    _class_source(src)
    os.symlink(src, src / "c" / "loop")  # a link into its own ancestry
    with pytest.raises(UserError, match=r"c/loop is a symbolic link to .*src, a folder that contains it"):
        FileTree(str(src)).list()
    os.remove(src / "c" / "loop")
    argv = ["convert", "--source", str(src), "--dest", str(tmp_path / "out"), "--num-workers", "0"]
    (src / "bb").mkdir()  # an empty class folder
    with pytest.raises(UserError, match=r"class folder .*src/bb holds no images"):
        dt.main(dt.parse_args(argv))
    os.rmdir(src / "bb")
    os.symlink(tmp_path / "nowhere", src / "bc")  # a broken link
    with pytest.raises(UserError, match=r"src/bc is a broken symbolic link"):
        dt.main(dt.parse_args(argv))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- image modes

def _png(img: PIL.Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _sixteen(mode: str) -> PIL.Image.Image:
    values = np.array([[0, 255, 256 * 100 + 200, 65535]], dtype=np.uint16)  # -> 0, 0, 100, 255
    return PIL.Image.frombytes(mode, (4, 1), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())


def _palette_with_transparency() -> PIL.Image.Image:
    img = PIL.Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0  # entry 0 transparent: its palette colour is kept, as convert("RGB")
    return img


GREY = [[0, 0, 100, 255]]
MODES = {  # mode -> (image bytes, expected (H, W, 3) uint8)
    "I;16": (_png(_sixteen("I;16")), GREY),
    "I;16B": (_png(_sixteen("I;16B"), "tiff"), GREY),
    "I": (_png(PIL.Image.fromarray(np.array([[0, 255, 25800, 65535]], np.int32), "I"), "tiff"), GREY),
    "L": (_png(PIL.Image.fromarray(np.array([[0, 77, 100, 255]], np.uint8))), [[0, 77, 100, 255]]),
    "1": (_png(PIL.Image.fromarray(np.array([[0, 1, 0, 1]], bool))), [[0, 255, 0, 255]]),
    "LA": (_png(PIL.Image.fromarray(np.array([[[100, 0], [50, 255]]], np.uint8), "LA")), [[100, 50]]),
    "RGBA": (_png(PIL.Image.fromarray(np.array([[[10, 20, 30, 0], [1, 2, 3, 128]]], np.uint8), "RGBA")),
             [[[10, 20, 30], [1, 2, 3]]]),
    "P": (_png(_palette_with_transparency()), [[[10, 20, 30], [200, 100, 50]]]),
    "CMYK": (_png(PIL.Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK"),
                  "tiff"), [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_converts_to_known_8_bit_rgb(mode):
    data, want = MODES[mode]
    assert PIL.Image.open(io.BytesIO(data)).mode == mode
    want = np.asarray(want, np.uint8)
    want = np.repeat(want[..., None], 3, axis=-1) if want.ndim == 2 else want
    got = decode_image(data, "x.png")
    assert got.dtype == np.uint8 and np.array_equal(got, want), got


@pytest.mark.parametrize("img, match", [
    (PIL.Image.fromarray(np.array([[0.0, 0.5]], np.float32), "F"), r"x.tif: image mode F is not supported"),
    (PIL.Image.fromarray(np.array([[-1, 70000]], np.int32), "I"), r"x.tif: mode I .* values in \[-1, 70000\]"),
])
def test_modes_without_an_8_bit_meaning_are_refused_by_name(img, match):
    with pytest.raises(UnsupportedImageMode, match=match):
        decode_image(_png(img, "tiff"), "x.tif")


def test_sixteen_bit_images_in_convert_encode_and_the_dataset(tmp_path):
    """The one conversion everywhere: a 16-bit source converts, encodes and trains as its high byte."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    want = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    raw = tmp_path / "raw"
    for c in ("a", "b"):
        (raw / c).mkdir(parents=True)
        PIL.Image.fromarray(values).save(raw / c / "0.png")  # I;16
    data = tmp_path / "DATA"
    dt.main(dt.parse_args(["convert", "--source", str(raw), "--dest", str(data / "imagenet_32_vae"),
                           "--num-workers", "0"]))
    assert np.array_equal(np.asarray(PIL.Image.open(data / "imagenet_32_vae" / "00000" / "img00000000.png")), want)
    # encode and the dataset read the 16-bit file itself (put in place of the converted one)
    PIL.Image.fromarray(values).save(data / "imagenet_32_vae" / "00000" / "img00000001.png")
    run_encode(data / "imagenet_32_vae", data / "vae-sd")
    moments = [np.load(data / "vae-sd" / "00000" / f"img-mean-std-0000000{i}.npy") for i in (0, 1)]
    assert np.array_equal(moments[0], moments[1])
    image, _, _ = CustomDataset(str(data), resolution=32, num_classes=2)[1]
    assert np.array_equal(image.permute(1, 2, 0).numpy(), want)


# ---------------------------------------------------------------------------------------------- latent dtype

def test_integer_latent_files_are_refused_not_cast(tmp_path):
    src = tmp_path / "DATA" / "imagenet_32_vae"
    write_dataset(str(src), num_images=3, resolution=32, num_classes=3, seed=0)
    run_encode(src, tmp_path / "DATA" / "vae-sd")
    second = tmp_path / "DATA" / "vae-sd" / "00000" / "img-mean-std-00000001.npy"
    np.save(second, np.load(second).astype(np.int16))  # same shape, integer values
    ds = CustomDataset(str(tmp_path / "DATA"), resolution=32, num_classes=3)
    ds[0]
    with pytest.raises(UserError, match=r"img-mean-std-00000001.npy holds int16 values, not floating-point"):
        ds[1]
    first = tmp_path / "DATA" / "vae-sd" / "00000" / "img-mean-std-00000000.npy"
    np.save(first, np.load(first).astype(np.int32))
    with pytest.raises(UserError, match=r"img-mean-std-00000000.npy holds int32 values"):  # at start-up
        CustomDataset(str(tmp_path / "DATA"), resolution=32, num_classes=3)
