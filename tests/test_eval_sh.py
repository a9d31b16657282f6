"""eval.sh wiring: generate with the paper's sampler settings into ADM format (evaluation itself is
covered by tests/test_evaluator.py and the quick-start test)."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

from checkpoint_io import export_safetensors
from models.sit import SiT_models

ROOT = Path(__file__).resolve().parents[1]


def test_eval_sh_generates_with_paper_defaults(tmp_path):
    torch.manual_seed(0)
    config = {"model": "SiT-T/2", "input_size": 2, "in_channels": 192, "num_classes": 4, "z_dims": [32],
              "encoder_depth": 2, "projector_dim": 64, "use_cls_token": True, "cls_token_dim": 32,
              "path_type": "linear", "resolution": 16, "latents_scale": 1.0, "vae": "pixel-unshuffle"}
    model = SiT_models["SiT-T/2"](**{k: config[k] for k in ("input_size", "in_channels", "num_classes", "z_dims",
                                                             "encoder_depth", "projector_dim", "cls_token_dim")})
    export_safetensors(tmp_path / "ema_0000010.safetensors", model.state_dict(), config)
    env = {**os.environ, "CKPT": str(tmp_path / "ema_0000010.safetensors"), "SKIP_EVAL": "1", "NUM_STEPS": "3",
           "NUM_FID_SAMPLES": "4", "PER_PROC_BATCH_SIZE": "4", "SAMPLE_DIR": str(tmp_path / "samples"),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(["bash", str(ROOT / "eval.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (npz,) = (tmp_path / "samples").glob("*.npz")
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (4, 16, 16, 3) and arr.dtype == np.uint8
    settings = json.loads(npz.with_suffix(".json").read_text())
    flat = json.dumps(settings)
    for key, value in (("cfg_scale", 2.3), ("cls_cfg_scale", 2.3), ("guidance_high", 0.85), ("num_steps", 3)):
        assert f'"{key}": {value}' in flat, key
    assert '"mode": "sde"' in flat

    # without SKIP_EVAL the reference batch must exist, and the message says where to get it
    env.pop("SKIP_EVAL")
    env["REF_BATCH"] = str(tmp_path / "missing.npz")
    bad = subprocess.run(["bash", str(ROOT / "eval.sh")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "VIRTUAL_imagenet256_labeled.npz" in bad.stderr
