"""What a run writes names no module of this repository: its pickles reference torch alone, so moving or
renaming our modules (as the reg/ layout did) can never make a saved checkpoint unloadable."""
from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

import torch

import train
from helpers import encoded_synthetic_data


def pickled_globals(path: Path) -> set[str]:
    """Every `module.name` the pickles inside a torch.save zip refer to (GLOBAL / STACK_GLOBAL opcodes)."""
    found = set()
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if not name.endswith(".pkl"):
                continue
            strings = []
            for op, arg, _ in pickletools.genops(z.read(name)):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                    strings.append(arg)
                elif op.name == "GLOBAL":
                    found.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.add(f"{strings[-2]}.{strings[-1]}")
    return found


def test_checkpoints_reference_torch_only_and_load_with_weights_only(tmp_path, fresh_accelerate_state):
    data = encoded_synthetic_data(tmp_path / "data", num_images=16)
    argv = ["--model", "SiT-T/2", "--data-dir", str(data), "--resolution", "32", "--num-classes", "4",
            "--batch-size", "4", "--enc-type", "dinov2-vit-s", "--enc-weights", "random", "--encoder-depth", "2",
            "--projector-dim", "64", "--output-dir", str(tmp_path / "exps"), "--exp-name", "run", "--num-workers", "0",
            "--report-to", "none", "--max-train-steps", "2", "--checkpointing-steps", "2"]
    train.main(train.parse_args(argv))
    ckpts = tmp_path / "exps" / "run" / "checkpoints"
    files = [ckpts / "0000002.pt", ckpts / "0000002.opt.pt"]
    for f in files:
        refs = pickled_globals(f)
        assert refs and all(r.startswith(("torch.", "collections.OrderedDict")) for r in refs), (f.name, refs)
        torch.load(f, map_location="cpu", weights_only=True)  # the safe unpickler takes it as is


def test_the_scan_sees_a_pickled_class_of_ours(tmp_path):
    """The check above on a file that does pickle one of our classes: it is named, so the test would fail."""
    from reg.checkpoints import CheckpointError
    torch.save({"error": CheckpointError("x"), "w": torch.zeros(1)}, tmp_path / "bad.pt")
    assert "reg.checkpoints.CheckpointError" in pickled_globals(tmp_path / "bad.pt")
