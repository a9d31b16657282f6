"""eval.sh: generate with the paper's sampler settings, then score exactly the npz generate.py wrote; and
the original REG eval.sh's two command lines (generate.py through torch.distributed.launch, then
./evaluations/evaluator.py) run unchanged on a tiny checkpoint."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import save_tiny_reg_checkpoint, save_tiny_vae
from models.sit import SiT_models

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    """The environment of an eval.sh run: its commands run this interpreter (PYTHON), whatever `python` is."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
           "REG_INCEPTION_WEIGHTS": "random", "PYTHON": sys.executable, **extra}
    return env


def _path_with_this_python(bin_dir: Path) -> str:
    """PATH with `python` as this interpreter first: the original eval.sh calls `python` by name."""
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a venv's python too
    (bin_dir / "python").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def _reference(path: Path, n: int = 6, side: int = 16) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, arr_0=rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8))
    return path


@pytest.fixture
def tiny_ckpt(tmp_path):
    return save_tiny_reg_checkpoint(tmp_path / "ema_0000010.safetensors")


def test_eval_sh_reports_the_npz_generate_wrote(tiny_ckpt, tmp_path):
    """SKIP_EVAL keeps this fast (the evaluator itself runs in the next-but-one test); the path eval.sh
    prints is the one it hands to the evaluator."""
    elsewhere = tmp_path / "cwd"  # eval.sh works from any directory, with relative paths
    elsewhere.mkdir()
    env = _env(CKPT=str(tiny_ckpt), NUM_STEPS="3", NUM_FID_SAMPLES="4", PER_PROC_BATCH_SIZE="4",
               SAMPLE_DIR="samples", SKIP_EVAL="1")
    # extra arguments that change the npz's name and folder reach generate.py, and eval.sh follows them
    done = subprocess.run(["bash", str(ROOT / "eval.sh"), "--sample-dir", "other", "--cfg-scale", "3.0"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert not (elsewhere / "samples").exists()
    (npz,) = (elsewhere / "other").glob("*.npz")
    assert "-cfg-3.0-" in npz.name
    assert f"samples: {npz.resolve()}" in done.stdout
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (4, 16, 16, 3) and arr.dtype == np.uint8
    settings = json.loads(npz.with_suffix(".json").read_text())
    assert (settings["cfg_scale"], settings["cls_cfg_scale"], settings["guidance_high"], settings["num_steps"],
            settings["mode"]) == (3.0, 2.3, 0.85, 3, "sde")


def test_eval_sh_runs_both_commands_with_the_python_named_by_PYTHON(tiny_ckpt, tmp_path):
    """PYTHON names the interpreter of both of eval.sh's commands (generate.py, then the evaluator), as in
    train.sh. The `python` on PATH here is a stand-in that fails: only PYTHON can make the run pass."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\necho "the python on PATH ran: $*" >&2\nexit 97\n')
    (bin_dir / "python").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    assert shutil.which("python", path=path) == str(bin_dir / "python")
    env = _env(CKPT=str(tiny_ckpt), NUM_STEPS="2", NUM_FID_SAMPLES="4", PER_PROC_BATCH_SIZE="4",
               SAMPLE_DIR=str(tmp_path / "samples"), REF_BATCH=str(_reference(tmp_path / "ref.npz", n=4)),
               PATH=path)  # _env sets PYTHON to this interpreter; 4 + 4 images: the fewest precision/recall take
    done = subprocess.run(["bash", str(ROOT / "eval.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "the python on PATH ran" not in done.stderr
    (npz,) = (tmp_path / "samples").glob("*.npz")
    metrics = json.loads(npz.with_name(npz.stem + "-metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and f"metrics: {npz.with_name(npz.stem + '-metrics.json')}" in done.stdout


def test_eval_sh_refuses_bad_settings(tiny_ckpt, tmp_path):
    env = _env(CKPT=str(tiny_ckpt), SKIP_EVAL="1")
    for bad in ("0", "two", "-1", "1.5"):
        out = subprocess.run(["bash", str(ROOT / "eval.sh")], cwd=tmp_path, env={**env, "NUM_GPUS": bad},
                             capture_output=True, text=True)
        assert out.returncode != 0 and "NUM_GPUS" in out.stderr, bad
    # without SKIP_EVAL the reference batch must exist, and the message says where to get it
    env.pop("SKIP_EVAL")
    out = subprocess.run(["bash", str(ROOT / "eval.sh")], cwd=tmp_path,
                         env={**env, "REF_BATCH": str(tmp_path / "missing.npz")}, capture_output=True, text=True)
    assert out.returncode != 0 and "VIRTUAL_imagenet256_labeled.npz" in out.stderr
    out = subprocess.run(["bash", str(ROOT / "eval.sh")], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "REF_BATCH": str(tmp_path / "missing.npz"), "RESOLUTION": "512"})
    assert out.returncode != 0 and "get VIRTUAL_imagenet512.npz from" in out.stderr  # ADM's 512 name: no _labeled


def _hub_cache_with_tiny_vae(cache: Path, which: str = "ema", seed: int = 0) -> None:
    """An HF hub cache in which 'stabilityai/sd-vae-ft-{which}' (--vae ema) is a tiny AutoencoderKL."""
    repo = cache / f"models--stabilityai--sd-vae-ft-{which}"
    commit = "0" * 40
    save_tiny_vae(str(repo / "snapshots" / commit), seed=seed)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


# The original eval.sh (REG repository), with its variables set to tiny values and the literal values
# sized down (model, sample count, projector and class-token widths, batch size); flags and layout unchanged.
ORIGINAL_EVAL_SH = r"""
random_number=$((RANDOM % 100 + 1200))
NUM_GPUS=1
STEP="0000100"
SAVE_PATH="{save_path}"
NUM_STEP=2
MODEL_SIZE='T'
CFG_SCALE=2.3
CLS_CFG_SCALE=2.3
GH=0.85

export NCCL_P2P_DISABLE=1

python -m torch.distributed.launch --master_port=$random_number --nproc_per_node=$NUM_GPUS generate.py \
  --model SiT-T/2 \
  --num-fid-samples 4 \
  --ckpt ${{SAVE_PATH}}/checkpoints/${{STEP}}.pt \
  --path-type=linear \
  --encoder-depth=1 \
  --projector-embed-dims=32 \
  --per-proc-batch-size=2 \
  --mode=sde \
  --num-steps=${{NUM_STEP}} \
  --cfg-scale=${{CFG_SCALE}} \
  --cls-cfg-scale=${{CLS_CFG_SCALE}} \
  --guidance-high=${{GH}} \
  --sample-dir ${{SAVE_PATH}}/checkpoints \
  --cls=32


python ./evaluations/evaluator.py \
    --ref_batch {ref} \
    --sample_batch ${{SAVE_PATH}}/checkpoints/SiT-${{MODEL_SIZE}}-2-${{STEP}}-size-256-vae-ema-cfg-${{CFG_SCALE}}-seed-0-sde-${{GH}}-${{CLS_CFG_SCALE}}.npz \
    --save_path ${{SAVE_PATH}}/checkpoints \
    --cfg_cond 1 \
    --step ${{STEP}} \
    --num_steps ${{NUM_STEP}} \
    --cfg ${{CFG_SCALE}} \
    --cls_cfg ${{CLS_CFG_SCALE}} \
    --gh ${{GH}}
"""


@pytest.mark.slow
def test_original_eval_sh_commands_run_unchanged(tmp_path):
    """An official-format checkpoint ({step}.pt with ema + argparse.Namespace), 256 px through a tiny
    AutoencoderKL served from the HF cache as --vae ema (the original's default)."""
    cache = tmp_path / "hub"
    _hub_cache_with_tiny_vae(cache)
    torch.manual_seed(0)
    model = SiT_models["SiT-T/2"](input_size=32, num_classes=4, z_dims=[32], encoder_depth=1, projector_dim=64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_path = tmp_path / "exp"
    (save_path / "checkpoints").mkdir(parents=True)
    official_args = argparse.Namespace(model="SiT-T/2", encoder_depth=1, path_type="linear", resolution=256,
                                       fused_attn=True, qk_norm=False, num_classes=4, cfg_prob=0.1)
    sd = model.state_dict()
    torch.save({"model": sd, "ema": sd, "opt": {}, "steps": 100, "args": official_args},
               save_path / "checkpoints" / "0000100.pt")
    script = tmp_path / "eval.sh"
    script.write_text(ORIGINAL_EVAL_SH.format(save_path=save_path, ref=_reference(tmp_path / "ref.npz")))
    done = subprocess.run(["bash", "-e", str(script)], cwd=ROOT,
                          env=_env(HF_HUB_CACHE=str(cache), PATH=_path_with_this_python(tmp_path / "bin")),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    npz = save_path / "checkpoints" / "SiT-T-2-0000100-size-256-vae-ema-cfg-2.3-seed-0-sde-0.85-2.3.npz"
    with np.load(npz) as data:
        assert data["arr_0"].shape == (4, 256, 256, 3)
    assert "FID" in done.stdout
    # the original evaluator's text file, named as REG's evaluator names it, beside the checkpoints folder
    assert list(save_path.glob("checkpoints2*cfg_cond_true.txt")), sorted(os.listdir(save_path))
    shutil.rmtree(cache)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_run_on_data_encoded_by_our_tool_decodes_with_ema_under_the_original_name(tmp_path, monkeypatch):
    """Our `encode` (default: sd-vae-ft-mse, as EDM2/REPA/REG) -> train.py -> generate.py: the samples are
    decoded with sd-vae-ft-ema, as the authors' generate.py does, and the npz carries the name the authors'
    eval.sh builds (`-vae-ema-`). Here ft-ema and ft-mse are two different tiny AutoencoderKLs in an HF cache."""
    from huggingface_hub import constants

    import generate
    import train
    from preprocessing import dataset_tools
    from preprocessing.synthetic import write_dataset

    cache = tmp_path / "hub"
    _hub_cache_with_tiny_vae(cache, "ema", seed=0)
    _hub_cache_with_tiny_vae(cache, "mse", seed=1)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at call time by the hub client
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    write_dataset(str(data / "imagenet_32_vae"), num_images=8, resolution=32, num_classes=2, seed=0)
    dataset_tools.main(dataset_tools.parse_args(["encode", "--source", str(data / "imagenet_32_vae"), "--dest",
                                                 str(data / "vae-sd"), "--batch-size", "8", "--num-workers", "0",
                                                 "--cpu"]))
    assert json.loads((data / "vae-sd" / "dataset.json").read_text())["vae"]["name"] == "stabilityai/sd-vae-ft-mse"
    train.main(train.parse_args(["--model", "SiT-T/2", "--method", "sit", "--data-dir", str(data), "--resolution",
                                 "32", "--num-classes", "2", "--batch-size", "4", "--max-train-steps", "1",
                                 "--output-dir", str(tmp_path / "exps"), "--exp-name", "run", "--num-workers", "0",
                                 "--report-to", "none"]))
    ckpt = tmp_path / "exps" / "run" / "checkpoints" / "0000001.pt"
    config = torch.load(ckpt, map_location="cpu", weights_only=True)["config"]
    assert (config["encode_vae"], config["vae"]) == ("stabilityai/sd-vae-ft-mse", "stabilityai/sd-vae-ft-ema")
    tail = ["--model", "SiT-T/2", "--resolution", "32", "--num-fid-samples", "2", "--per-proc-batch-size", "2",
            "--num-steps", "2", "--sample-dir", str(tmp_path / "samples")]
    args = generate.parse_args(["--ckpt", str(ckpt), *tail])
    generate.main(args)
    # the authors' generate.py folder name (their `--vae` default is "ema"), as their eval.sh rebuilds it
    name = (f"{args.model.replace('/', '-')}-{os.path.basename(args.ckpt).replace('.pt', '')}-size-{args.resolution}"
            f"-vae-ema-cfg-{args.cfg_scale}-seed-{args.global_seed}-{args.mode}-{args.guidance_high}-{args.cls_cfg_scale}")
    npz = tmp_path / "samples" / f"{name}.npz"
    assert npz.is_file(), sorted(os.listdir(tmp_path / "samples"))
    assert json.loads(npz.with_suffix(".json").read_text())["vae"] == "stabilityai/sd-vae-ft-ema"
    # a checkpoint of ours from before `encode_vae` existed (its `vae` was the encoding VAE) decodes the same way
    old = torch.load(ckpt, map_location="cpu", weights_only=True)
    old["config"] = {k: v for k, v in old["config"].items() if k != "encode_vae"} | {"vae": "stabilityai/sd-vae-ft-mse"}
    torch.save(old, tmp_path / "old.pt")
    generate.main(generate.parse_args(["--ckpt", str(tmp_path / "old.pt"), *tail]))
    assert (tmp_path / "samples" / f"{name.replace('-0000001-', '-old-')}.npz").is_file()
