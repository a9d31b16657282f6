"""Plain helpers shared by several test files (not production code, and no fixtures: those are in
conftest.py): tiny stand-ins for pretrained weights, checkpoints and data, train.py's tiny settings, sweep.py's
stand-in Inception, a two-process launcher, a check that every changed setting is refused, the list of
command-line tools (found by reading the repository's files), and data folders written by hand.

Import with `from helpers import save_tiny_vae` (pytest puts tests/ on sys.path). A test file never imports
from another test file: what two of them share lives here or in conftest.py.
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def save_tiny_vae(path: str, *, seed: int = 0, latent_channels: int = 4) -> str:
    """Save a tiny randomly initialised AutoencoderKL (downsampling 8) with save_pretrained; return path."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(path)
    return path


def save_tiny_reg_checkpoint(path, *, perturb: float = 0.0, seed: int = 0):
    """A SiT-T/2 + REG EMA export (16 px images, pixel-unshuffle latents, 4 classes): the smallest model the
    sampling tools accept. `perturb` moves the zero-initialised output layers so the samples are not constant."""
    import torch

    from models.sit import SiT_models
    from reg.checkpoints import export_safetensors

    torch.manual_seed(seed)
    config = {"model": "SiT-T/2", "input_size": 2, "in_channels": 192, "num_classes": 4, "z_dims": [32],
              "encoder_depth": 2, "projector_dim": 64, "use_cls_token": True, "cls_token_dim": 32,
              "path_type": "linear", "resolution": 16, "latents_scale": 1.0, "vae": "pixel-unshuffle"}
    model = SiT_models["SiT-T/2"](**{k: config[k] for k in ("input_size", "in_channels", "num_classes", "z_dims",
                                                             "encoder_depth", "projector_dim", "cls_token_dim")})
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    export_safetensors(path, model.state_dict(), config)
    return path


def run_two_processes(target, timeout: float = 60) -> list:
    """Fork two processes running target(rank, port, queue) (port: a free one for a gloo group of two, to
    set as MASTER_PORT) and return what they put on the queue, in arrival order."""
    import multiprocessing
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    return [out.get(timeout=5) for _ in procs]


def encoded_synthetic_data(root, *, num_images: int = 64, resolution: int = 32, num_classes: int = 4):
    """ROOT/imagenet_{R}_vae (preprocessing.synthetic) and ROOT/vae-sd, encoded with the weight-free
    pixel-unshuffle codec: a training data folder. Returns ROOT."""
    from preprocessing import dataset_tools
    from preprocessing.synthetic import write_dataset
    images = root / f"imagenet_{resolution}_vae"
    write_dataset(str(images), num_images=num_images, resolution=resolution, num_classes=num_classes, seed=0)
    dataset_tools.main(dataset_tools.parse_args(
        ["encode", "--source", str(images), "--dest", str(root / "vae-sd"),
         "--model-url", "pixel-unshuffle", "--batch-size", "32"]))
    return root


def offline_hf_cache(tmp_path, monkeypatch, repo: str, folder) -> Path:
    """An HF cache (HF_HUB_CACHE in tmp, offline) holding `folder`'s files as the main revision of `repo`; returns
    the cache folder (HF_HUB_CACHE for a subprocess)."""
    import shutil

    import huggingface_hub.constants as hub_constants
    cache = tmp_path / "hf-cache"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    commit = "2" * 40
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    from huggingface_hub import scan_cache_dir
    report = scan_cache_dir(cache)  # huggingface_hub's own reader accepts the layout
    assert not report.warnings and [r.repo_id for r in report.repos] == [repo]
    return cache


# The SiT-T/2 the checkpoint and loading tests save and load: 10 classes, a 32-d projection, 4x4 latents.
CHECKPOINT_SIT = dict(input_size=4, in_channels=4, num_classes=10, z_dims=[32], encoder_depth=2, projector_dim=48)


def checkpoint_sit():
    """SiT-T/2 of CHECKPOINT_SIT, its weights drawn N(0, 0.05) with seed 0."""
    from models.sit import SiT_models
    torch.manual_seed(0)
    m = SiT_models["SiT-T/2"](**CHECKPOINT_SIT)
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    return m


def tiny_argv(data_dir, out, exp="run", *extra):
    """train.py's flags for a tiny run on `data_dir` (encoded_synthetic_data: 32 px, 4 classes), into OUT/EXP."""
    return ["--model", "SiT-T/2", "--data-dir", str(data_dir), "--resolution", "32", "--num-classes", "4",
            "--batch-size", "8", "--enc-type", "dinov2-vit-s", "--enc-weights", "random", "--encoder-depth", "2",
            "--projector-dim", "256", "--output-dir", str(out), "--exp-name", exp, "--num-workers", "0",
            "--report-to", "none", "--log-every", "2", *extra]


class FakeInception(torch.nn.Module):
    """Features that are the pixels themselves: equal images <=> equal features."""
    weights, weights_id, random_weights = "fake", "fake", True

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the accumulator a device

    def forward(self, x):
        f = x.float().flatten(1)
        def take(n):
            return f[:, torch.arange(n) % f.shape[1]] + torch.arange(n) * 1e-3
        return take(2048), take(2023), take(1008)


def fake_metrics(ref, sample, **_):
    return {"fid": float(np.abs(sample.mu - ref.mu).mean()), "sfid": float(np.abs(sample.mu_s - ref.mu_s).mean()),
            "inception_score": float(sample.logits.mean()), "precision": 0.5, "recall": 0.5}


def run_sweep(root, *extra):
    """sweep.py on the `sweep_setup` folder (conftest.py): 5 settings of 6 images each, unless `extra` says
    otherwise."""
    import sweep
    # 3 SDE steps: t = 1, 0.52, 0.04; the interval [0.5, 0.51] holds none of them
    argv = ["--ckpt", str(root / "ema.safetensors"), "--ref-batch", str(root / "ref.npz"), "--out", str(root / "out"),
            "--cfg-scale", "1,1.5,3", "--cls-cfg-scale", "1.5", "--guidance-low", "0.5",
            "--guidance-high", "0.51,1.0", "--num-steps", "3", "--num-samples", "6", "--per-proc-batch-size", "4",
            "--device", "cpu", "--inception-weights", "random", "--eval-batch-size", "4", *extra]
    return sweep.main(sweep.parse_args(argv))


def each_change_is_refused(check, base: dict, table: dict) -> None:
    """check(settings) must refuse a change of every key of `table`, one at a time, naming the key."""
    for key, (value, why) in table.items():
        assert key in base and base[key] != value, key
        with pytest.raises(ValueError, match=rf"[(;] ?{key}: "):
            check({**base, key: value})
            pytest.fail(f"a change of {key} ({why}) was accepted")


class _Parser(Exception):
    pass


def parser_of(parse_args, argv=()) -> argparse.ArgumentParser:
    """The ArgumentParser a module's parse_args builds (caught at its parse_args call)."""
    def capture(self, *a, **k):
        raise _Parser(self)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Parser) as e:
            parse_args(list(argv))
    return e.value.args[0]


# ----------------------------------------------------------------------------- the command-line tools, found

def _is_main_block(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":` at a module's top level."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def _parses_a_command_line(tree: ast.Module) -> bool:
    """Defines parse_args, or calls some parser's .parse_args (an ArgumentParser built inside main)."""
    return any((isinstance(n, ast.FunctionDef) and n.name == "parse_args")
               or (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "parse_args")
               for n in ast.walk(tree))


def command_line_tool_files(root: Path = ROOT) -> list[str]:
    """Every Python file of the repository (tests/ and hidden folders aside) with an `if __name__ ==
    "__main__":` block that parses a command line: the command-line tools, found by reading the files, so a
    new tool is tested without being listed anywhere. Paths relative to root, with "/"."""
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and not (here == root and d == "tests")
                         and not (here / d / "pyvenv.cfg").exists())
        for name in sorted(files):
            if name.endswith(".py"):
                tree = ast.parse((here / name).read_text(encoding="utf-8"), filename=str(here / name))
                if any(_is_main_block(node) for node in tree.body) and _parses_a_command_line(tree):
                    found.append((here / name).relative_to(root).as_posix())
    return found


@dataclass(frozen=True)
class Cli:
    """One command line: a tool's file and, for a tool with subcommands, one subcommand (`prefix`)."""
    path: str                 # "preprocessing/dataset_tools.py"
    prefix: tuple[str, ...]   # ("encode",): the argv that reaches this (sub)command's flags

    @property
    def name(self) -> str:
        return " ".join([self.path, *self.prefix])

    @property
    def module(self):
        return importlib.import_module(self.path[:-len(".py")].replace("/", "."))

    def run(self, argv: list[str]):
        """The tool's own entry, as its command line calls it: parse_args(argv), else main(argv), else main()
        reading sys.argv. Only for argv that stop at the parser (--help, a bad value): anything else runs it."""
        module = self.module
        if hasattr(module, "parse_args"):
            return module.parse_args([*self.prefix, *argv])
        if inspect.signature(module.main).parameters:
            return module.main([*self.prefix, *argv])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", [self.path, *self.prefix, *argv])
            return module.main()

    def top_parser(self) -> argparse.ArgumentParser:
        """The ArgumentParser the entry builds, caught at its parse_args call (nothing after it runs)."""
        return parser_of(Cli(self.path, ()).run)

    def parser(self) -> argparse.ArgumentParser:
        """This (sub)command's own parser."""
        parser = self.top_parser()
        for word in self.prefix:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices[word]
        return parser

    def parse(self, argv: list[str]) -> argparse.Namespace:
        """argv parsed by the tool's parser (prefix added), without running the tool."""
        return self.top_parser().parse_args([*self.prefix, *argv])


@functools.lru_cache(maxsize=None)
def command_line_tools() -> tuple[Cli, ...]:
    """command_line_tool_files, one Cli per command: a tool with subcommands gives one per subcommand."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    clis = []
    for path in command_line_tool_files():
        parser = Cli(path, ()).top_parser()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        clis += [Cli(path, (word,)) for word in subs[0].choices] if subs else [Cli(path, ())]
    return tuple(clis)


# ----------------------------------------------------------------------------- data folders written by hand

def make_data(root, n: int = 6, res: int = 32, channels: int = 4, *, labels=None, vae=None, seed: int = 0):
    """Write DATA/imagenet_{res}_vae/ and DATA/vae-sd/ by hand (random pixels and moments, no encode record,
    as the authors' tools leave a folder); return (images, moments, labels)."""
    import json

    import PIL.Image
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    moments = rng.standard_normal((n, 2 * channels, res // 8, res // 8)).astype(np.float32)
    labels = list(rng.integers(0, 10, n)) if labels is None else labels
    entry_label = (lambda i: 0) if labels == "null" else (lambda i: labels[i])
    entries = []
    for i in range(n):
        s = f"{i:08d}"
        img_path = os.path.join(root, f"imagenet_{res}_vae", s[:5], f"img{s}.png")
        npy_name = f"{s[:5]}/img-mean-std-{s}.npy"
        os.makedirs(os.path.dirname(img_path), exist_ok=True)
        os.makedirs(os.path.join(root, "vae-sd", s[:5]), exist_ok=True)
        PIL.Image.fromarray(images[i]).save(img_path)
        np.save(os.path.join(root, "vae-sd", npy_name), moments[i])
        label = entry_label(i)
        entries.append([npy_name, label if isinstance(label, float) else int(label)])
    meta = {"labels": entries if labels != "null" else None}
    if vae is not None:
        meta["vae"] = vae
    with open(os.path.join(root, "vae-sd", "dataset.json"), "w") as f:
        json.dump(meta, f)
    return images, moments, labels


def zip_folder(folder, archive, prefix: str = "", compression: int = 0):
    """An uncompressed zip of a folder's files (`compression`: zipfile.ZIP_DEFLATED for a compressed one), each
    under `prefix` + its relative path."""
    import zipfile
    with zipfile.ZipFile(archive, "w", compression=compression) as z:
        for dirpath, _dirs, files in os.walk(folder):
            for f in files:
                path = os.path.join(dirpath, f)
                z.write(path, prefix + os.path.relpath(path, folder).replace(os.sep, "/"))
