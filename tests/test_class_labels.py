"""generate.py --class-labels / --class-names / labelled --grid (reg/class_grid.py), on the tiny pixel-unshuffle
REG checkpoint: the labels land in the npz, image i keeps its own noise, and the figure has one row per class."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import generate
from reg.class_grid import grid_rows, parse_class_labels
from reg.utils import UserError


def run(ckpt, out, *extra):
    argv = ["--ckpt", str(ckpt), "--sample-dir", str(out), "--num-steps", "3", "--mode", "unipc",
            "--cfg-scale", "2.0", "--global-seed", "5", "--device", "cpu", "--per-proc-batch-size", "3", *extra]
    return generate.main(generate.parse_args(argv))


def test_parse_class_labels(tmp_path):
    assert parse_class_labels("1, 207,360") == [1, 207, 360]
    f = tmp_path / "labels.txt"
    f.write_text("# my classes\n3\n\n1  # a comment\n")
    assert parse_class_labels(f"@{f}", num_classes=4) == [3, 1]
    for bad, match in [("1,x", "integer"), ("", "no class"), ("1,4", r"\[0, 4\)"), ("-1", r"\[0, 4\)"),
                       (f"@{tmp_path / 'missing'}", "cannot read")]:
        with pytest.raises(UserError, match=match):
            parse_class_labels(bad, num_classes=4)
    assert grid_rows([2, 0, 2], 8, 2) == {2: [0, 2], 0: [1, 4]}


def test_class_labels_npz_seeds_and_labelled_grid(tiny_reg_ckpt, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("tench\ngoldfish\nwhite shark\ntiger shark\n")
    run(tiny_reg_ckpt, tmp_path / "a", "--num-fid-samples", "5", "--class-labels", "3,1", "--grid", "2",
        "--class-names", str(names), "--run-name", "a")
    with np.load(tmp_path / "a" / "a.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert labels.tolist() == [3, 1, 3, 1, 3]
    # Image i depends on (seed, i) and its own label only: the same image 0 and 2 with another list.
    run(tiny_reg_ckpt, tmp_path / "b", "--num-fid-samples", "3", "--class-labels", "3,2", "--run-name", "b")
    with np.load(tmp_path / "b" / "b.npz") as data:
        other = data["arr_0"]
    assert np.array_equal(other[0], images[0]) and np.array_equal(other[2], images[2])
    assert not np.array_equal(other[1], images[1])  # class 2 instead of 1

    # the list is a setting of the run: resuming the folder with another list is refused
    with pytest.raises(ValueError, match="class_labels"):
        run(tiny_reg_ckpt, tmp_path / "a", "--num-fid-samples", "5", "--class-labels", "3,2", "--run-name", "a")
    names = [generate.default_run_name(generate.parse_args(["--ckpt", str(tiny_reg_ckpt), *labels]),
                                       "SiT-T/2", 16, "ema")
             for labels in (["--class-labels", "3,1"], ["--class-labels", "3,2"], [])]
    assert len(set(names)) == 3 and names[0].startswith(names[2] + "-classes-")

    grid = np.asarray(Image.open(tmp_path / "a" / "a-grid.png").convert("RGB"))
    side = images.shape[1]
    assert grid.shape[0] == 2 * side and (grid.shape[1] - 2 * side) > side  # 2 rows, a label strip, 2 columns
    left = grid.shape[1] - 2 * side
    for row, idx in enumerate([[0, 2], [1, 3]]):  # class 3 first (as listed), then class 1
        for col, i in enumerate(idx):
            assert np.array_equal(grid[row * side:(row + 1) * side, left + col * side:left + (col + 1) * side],
                                  images[i])
        strip = grid[row * side:(row + 1) * side, :left]
        assert (strip < 128).any() and (strip == 255).mean() > 0.5  # dark text on white


def test_class_labels_refusals(tiny_reg_ckpt, tmp_path):
    with pytest.raises(UserError, match="--balanced"):
        run(tiny_reg_ckpt, tmp_path, "--num-fid-samples", "2", "--class-labels", "1", "--balanced")
    with pytest.raises(UserError, match="--class-names"):
        run(tiny_reg_ckpt, tmp_path, "--num-fid-samples", "2", "--class-names", "x.txt")
    with pytest.raises(UserError, match=r"\[0, 4\)"):
        run(tiny_reg_ckpt, tmp_path, "--num-fid-samples", "2", "--class-labels", "1,7")
