"""train.py's data at start and on resume (docs/data.md#the-data-check): the files are compared with what encode
recorded (reg/data_check.py, --data-check), so that another image folder of the same names, sizes and labels,
or a latent file overwritten since, is refused before the first step, naming a file; and the data's mistakes
met in training end in one line."""
from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile

import numpy as np
import pytest

import train
from dataset import CustomDataset
from helpers import encoded_synthetic_data, make_data, tiny_argv, zip_folder
from preprocessing import dataset_tools as dt
from preprocessing.records import HASH_DIR
from preprocessing.synthetic import write_dataset
from reg.data_check import check_content
from reg.utils import UserError, run_main

OTHER_CONTENT = r"has other content than when encoded \(sha256 \w{12} now, \w{12} then\)"


@pytest.fixture
def data(tmp_path, data_dir):
    """A copy of conftest's data folder (64 synthetic 32 px images, 4 classes, encoded with our encode)."""
    return shutil.copytree(data_dir, tmp_path / "data", ignore=shutil.ignore_patterns("reg-index-*"))


def swap_images(root, seed: int = 1) -> None:
    """Replace the image folder by other images with the same names, sizes and labels."""
    images = root / "imagenet_32_vae"
    sizes = {p.relative_to(images): p.stat().st_size for p in images.rglob("*.png")}
    labels = (images / "dataset.json").read_text()
    shutil.rmtree(images)
    write_dataset(str(images), num_images=len(sizes), resolution=32, num_classes=4, seed=seed)
    (images / "dataset.json").write_text(labels)
    assert {p.relative_to(images): p.stat().st_size for p in images.rglob("*.png")} == sizes


def open_data(root, **kw) -> CustomDataset:
    return CustomDataset(str(root), resolution=32, num_classes=4, report=lambda m: None, **kw)


@pytest.mark.usefixtures("fresh_accelerate_state", "flops_counted_once_per_architecture")
def test_train_refuses_images_swapped_for_others_of_the_same_names_sizes_and_labels(data, tmp_path):
    train.main(train.parse_args(tiny_argv(data, tmp_path, "run", "--max-train-steps", "2")))
    saved = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    swap_images(data)
    for exp in ("run", "fresh"):  # a resume, and a new run
        with pytest.raises(UserError, match=r"imagenet_32_vae/00000/img000000\d\d.png " + OTHER_CONTENT):
            train.main(train.parse_args(tiny_argv(data, tmp_path, exp, "--max-train-steps", "4",
                                                  "--checkpointing-steps", "1")))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == saved  # refused before the first step
    assert not list((tmp_path / "fresh").rglob("*.pt"))


def test_a_sample_catches_a_swap_of_all_images_one_image_only_the_full_check(data, tmp_path):
    original = shutil.copytree(data / "imagenet_32_vae", tmp_path / "original")
    swap_images(data)
    ds = open_data(data)
    for seed in range(4):  # whatever the sample, it meets swapped images
        assert check_content(ds, "sample", seed=seed, sample_size=2)[0] is not None
    shutil.rmtree(data / "imagenet_32_vae")
    shutil.copytree(original, data / "imagenet_32_vae")
    other = tmp_path / "other"
    write_dataset(str(other), num_images=64, resolution=32, num_classes=4, seed=2)
    shutil.copy(other / "00000" / "img00000037.png", data / "imagenet_32_vae" / "00000" / "img00000037.png")
    ds = open_data(data)
    problem, _ = check_content(ds, "full")
    assert "img00000037.png has other content" in problem
    # a sample of half the items finds the one swapped file for some seeds and misses it for others: only the
    # full check is sure to (docs/data.md#the-data-check)
    found = [check_content(ds, "sample", seed=seed, sample_size=32)[0] is not None for seed in range(16)]
    assert any(found) and not all(found)


def test_ranks_hash_their_own_shares(data):
    """Each rank hashes every world-th item of the sample: one changed file is found by one rank only, which is
    why train.py gathers the ranks' findings before any of them goes on."""
    victim = data / "vae-sd" / "00000" / "img-mean-std-00000031.npy"
    np.save(victim, np.load(victim) + 1)
    ds = open_data(data)
    found = [check_content(ds, "full", rank=rank, world=2)[0] for rank in (0, 1)]
    assert [p is not None for p in found] == [False, True] and "img-mean-std-00000031.npy" in found[1]


def test_a_latent_overwritten_after_encode_is_refused_by_training_and_by_encode(data):
    victim = data / "vae-sd" / "00000" / "img-mean-std-00000021.npy"
    np.save(victim, np.load(victim) * 1.01)  # the same size, other values
    with pytest.raises(UserError, match=r"img-mean-std-00000021.npy is not the file encode wrote"):
        dt.main(dt.parse_args(["encode", "--source", str(data / "imagenet_32_vae"), "--dest", str(data / "vae-sd"),
                               "--model-url", "pixel-unshuffle", "--num-workers", "0", "--cpu"]))
    problem, _ = check_content(open_data(data), "sample")
    assert problem.startswith(f"{victim} {OTHER_CONTENT[:29]}".replace("\\", ""))


def test_labels_changed_after_encode_are_refused_and_off_checks_nothing(data):
    path = data / "vae-sd" / "dataset.json"
    meta = json.loads(path.read_text())
    meta["labels"][9][1] = (meta["labels"][9][1] + 1) % 4
    path.write_text(json.dumps(meta))
    ds = open_data(data)
    problem, _ = check_content(ds, "sample")
    assert f"gives {meta['labels'][9][0]} the label {meta['labels'][9][1]}, but it was encoded with" in problem
    assert check_content(ds, "off") == (None, "data check off (--data-check off): the files are not compared with "
                                              "the encode record")


def test_the_authors_data_has_no_record_and_trains_on_pairing_and_labels(tmp_path):
    make_data(tmp_path, n=6, labels=[0, 1, 2, 3, 0, 1])
    ds = open_data(tmp_path)
    problem, checked = check_content(ds, "sample")
    assert problem is None and "no encode record" in checked and "pairing and labels were checked" in checked
    with pytest.raises(UserError, match=r"--data-check full: .*vae-sd has no encode record"):
        check_content(ds, "full")


def test_records_of_an_older_encode_still_check_the_images(data):
    for record in (data / "vae-sd" / HASH_DIR).iterdir():  # rows of four fields: no sizes, no latent hashes
        rows = json.loads(record.read_text())
        rows["images"] = [row[:4] for row in rows["images"]]
        record.write_text(json.dumps(rows))
    victim = data / "vae-sd" / "00000" / "img-mean-std-00000003.npy"
    np.save(victim, np.load(victim) + 1)
    assert check_content(open_data(data), "full")[0] is None  # latents were not recorded then
    swap_images(data)
    assert "has other content" in check_content(open_data(data), "sample")[0]


def test_an_unreadable_image_is_left_to_skip_bad_samples(data):
    (data / "imagenet_32_vae" / "00000" / "img00000011.png").write_bytes(b"not a png")
    problem, _ = check_content(open_data(data), "sample")
    assert "img00000011.png is 9 bytes, but" in problem
    assert check_content(open_data(data, skip_bad_samples=True), "full")[0] is None  # replaced, not mixed in


def test_zips_carry_the_record(data, tmp_path):
    root = tmp_path / "zipped"
    root.mkdir()
    dt.main(dt.parse_args(["encode", "--source", str(data / "imagenet_32_vae"), "--dest", str(root / "vae-sd.zip"),
                           "--model-url", "pixel-unshuffle", "--num-workers", "0", "--cpu"]))
    with zipfile.ZipFile(root / "vae-sd.zip") as z:
        assert f"{HASH_DIR}/img-mean-std-00000000.json" in z.namelist()
    zip_folder(data / "imagenet_32_vae", root / "imagenet_32_vae.zip")
    assert check_content(open_data(root), "full")[0] is None
    swap_images(data)
    (root / "imagenet_32_vae.zip").unlink()
    zip_folder(data / "imagenet_32_vae", root / "imagenet_32_vae.zip")
    assert "has other content" in check_content(open_data(root), "sample")[0]


# ----------------------------------------------------------------------------- one line for the data's mistakes

def run_train_cli(argv, monkeypatch, capsys) -> tuple[int, str]:
    """train.py as its command line runs it (reg.utils.run_main): (exit status, what stderr holds from its error
    line on; the progress bar before it ends in a carriage return, not a new line)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    monkeypatch.delenv("REG_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_main(train.main, train.parse_args)
    err = capsys.readouterr().err
    assert err.count("train.py: error: ") == 1, err
    return e.value.code, err[err.index("train.py: error: "):]


@pytest.mark.usefixtures("fresh_accelerate_state", "flops_counted_once_per_architecture")
def test_a_corrupt_image_met_by_a_worker_mid_training_is_one_line(data, tmp_path, monkeypatch, capsys):
    victim = data / "imagenet_32_vae" / "00000" / "img00000005.png"
    victim.write_bytes(b"not a png")
    argv = tiny_argv(data, tmp_path, "run", "--max-train-steps", "16", "--data-check", "off", "--num-workers", "2")
    code, error = run_train_cli(argv, monkeypatch, capsys)
    assert code == 2 and error.rstrip("\n").count("\n") == 0, error  # one line, the last
    assert f"corrupt or unreadable image {victim}: " in error and "Traceback" not in error


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_dataset_smaller_than_one_global_batch_is_refused_at_start(data, tmp_path, monkeypatch):
    def build_models(*a, **k):
        raise AssertionError("the models were built before the data was refused")
    monkeypatch.setattr(train, "build_models", build_models)
    with pytest.raises(UserError, match=r"--data-dir .*data holds 64 items, fewer than one global batch "
                                        r"\(--batch-size 128\)"):
        train.main(train.parse_args(tiny_argv(data, tmp_path, "run", "--batch-size", "128")))
