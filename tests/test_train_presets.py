"""train.sh's presets: each trains a run the paper reports (evaluations/paper_results.json), the default the one
whose FID the README quotes, and the docs say which row each one is. train.sh is read through its DRY_RUN
output, parsed by train.py's own parser, so a preset is what train.py would run."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

import train
from evaluations.compare import paper_reference

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's training set


def preset_args(preset: str | None, *extra: str):
    """train.py's parsed arguments for `PRESET=preset bash train.sh extra...`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PRESET", "NUM_NODES", "MAIN_ADDR")}
    env.update(DRY_RUN="1", NUM_GPUS="8", **({"PRESET": preset} if preset else {}))
    out = subprocess.run(["bash", str(ROOT / "train.sh"), *extra], env=env, capture_output=True, text=True,
                         timeout=30, check=True).stdout
    words = shlex.split(out)
    return train.parse_args(words[words.index("train.py") + 1:])


def published(args, guided: bool) -> list[float]:
    """The paper's FIDs for this REG run's model and length, with or without guidance."""
    return [r["fid"] for r in paper_reference(args.model) if r["method"] == "reg"
            and r["iterations"] == args.max_train_steps and r["guidance"] == guided]


def test_default_preset_trains_the_run_the_readme_quotes():
    """bash train.sh: SiT-XL/2 + REG for 4M steps (800 epochs: --epochs does not stop it first), the run
    whose checkpoint the README's eval.sh line scores and whose guided FID (1.36) it quotes."""
    args = preset_args(None)
    assert args.model == "SiT-XL/2" and args.max_train_steps == 4_000_000
    batches_per_epoch = IMAGENET_TRAIN // args.batch_size
    assert args.epochs * batches_per_epoch >= args.max_train_steps  # the step count, not the epochs, ends it
    assert round(args.max_train_steps / batches_per_epoch, -1) == 800
    assert published(args, guided=True) == [1.36]
    readme = (ROOT / "README.md").read_text()
    assert f"checkpoints/{args.max_train_steps}.pt" in readme and "FID 1.36" in readme


@pytest.mark.parametrize("preset", ["XL", "L", "B"])
def test_every_preset_is_a_published_row_and_the_docs_say_which(preset):
    args = preset_args(preset)
    fids = published(args, guided=False) + published(args, guided=True)
    assert fids, f"PRESET={preset}: no published REG result for {args.model} at {args.max_train_steps} steps"
    train_section = (ROOT / "README.md").read_text().split("## Train")[1].split("\n## ")[0]
    row = next(line for line in train_section.splitlines() if line.startswith(f"| `{preset}`"))
    assert all(f"{fid:g}" in row for fid in fids), (row, fids)
    assert f"{args.model} + REG" in row
    training = (ROOT / "docs" / "training.md").read_text()
    assert all(f"{fid:g}" in training for fid in fids)


def test_flags_after_the_preset_win():
    assert preset_args("B", "--max-train-steps", "1000000").max_train_steps == 1_000_000
    assert preset_args("B").max_train_steps == 400_000 and preset_args("B").model == "SiT-B/2"


def test_train_sh_comment_names_each_preset_row():
    """The script's own header names each preset's row: its model, length and FID."""
    header = "".join(line for line in (ROOT / "train.sh").read_text().splitlines(keepends=True)
                     if line.startswith("#"))
    for preset in ("XL", "L", "B"):
        args = preset_args(preset)
        entry = re.search(rf"^#\s+{preset}\s+(.*(?:\n#\s{{5,}}.*)*)", header, re.M)
        assert entry, preset
        text = entry.group(1)
        steps = f"{args.max_train_steps // 1_000_000}M" if args.max_train_steps >= 1_000_000 else \
            f"{args.max_train_steps // 1000}K"
        assert f"{args.model} + REG, {steps} steps" in text, text
        for fid in published(args, guided=False) + published(args, guided=True):
            assert f"{fid:g}" in text, (preset, fid, text)
