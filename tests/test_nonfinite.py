"""Never a NaN turned into data: a non-finite sample is an error naming its image (generate.py writes no PNG
of its batch and no npz, sweep.py and the in-training evaluation no FID), and a checkpoint with non-finite
weights is refused at load, naming the tensor. Tiny SiT-T/2 on the pixel-unshuffle codec, CPU."""
from __future__ import annotations

import argparse
import functools
import json

import numpy as np
import pytest
import torch

import generate
import sweep
from helpers import FakeInception, fake_metrics
from reg.checkpoints import NonFiniteCheckpointError
from reg.loading import read_weights
from reg.seeded_images import NonFiniteSampleError
from reg.utils import UserError

BAD_INDEX = 5  # 6 images in batches of 4: image 5 is row 1 of the second batch (2 rows)


def nan_for_second_row_of_last_batch(model):
    """Make the model's velocity NaN for row 1 of a 2-row batch (image BAD_INDEX, run unguided)."""
    forward = model.forward

    @functools.wraps(forward)  # keeps the signature the sampler inspects
    def patched(x, *args, **kwargs):
        out = forward(x, *args, **kwargs)
        if x.shape[0] == 2:
            v = out[0].clone()
            v[1] = float("nan")
            out = (v, *out[1:])
        return out

    model.forward = patched
    return model


def test_generate_names_the_non_finite_image_and_writes_no_png_of_it_and_no_npz(tiny_reg_ckpt, tmp_path, monkeypatch):
    load_generator = generate.load_generator

    def patched(*args, **kwargs):
        loaded = load_generator(*args, **kwargs)
        return loaded._replace(model=nan_for_second_row_of_last_batch(loaded.model))

    monkeypatch.setattr(generate, "load_generator", patched)
    argv = ["--ckpt", str(tiny_reg_ckpt), "--sample-dir", str(tmp_path), "--run-name", "run", "--num-fid-samples", "6",
            "--per-proc-batch-size", "4", "--num-steps", "3", "--cfg-scale", "1.0", "--device", "cpu"]
    with pytest.raises(NonFiniteSampleError, match=rf"^image {BAD_INDEX} is not finite .*latents.*--cfg-scale 1.0"):
        generate.main(generate.parse_args(argv))
    assert sorted(p.name for p in (tmp_path / "run").glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".*.tmp"))
    # the PNGs of the finite images are real images, not black
    from PIL import Image
    assert np.asarray(Image.open(tmp_path / "run" / "000001.png")).std() > 0
    assert issubclass(NonFiniteSampleError, UserError)  # printed as one line by the entry points


def test_generate_refuses_a_checkpoint_with_one_nan_tensor(tiny_reg_ckpt, tmp_path):
    from safetensors.torch import load_file

    from reg.checkpoints import export_safetensors
    sd = load_file(str(tiny_reg_ckpt))
    key = "blocks.1.mlp.fc1.weight"
    sd[key][3, 2] = float("nan")
    config = json.loads(tiny_reg_ckpt.with_suffix(".json").read_text())
    export_safetensors(tmp_path / "nan.safetensors", sd, config)
    argv = ["--ckpt", str(tmp_path / "nan.safetensors"), "--sample-dir", str(tmp_path / "samples"),
            "--num-fid-samples", "2", "--num-steps", "2", "--device", "cpu"]
    with pytest.raises(NonFiniteCheckpointError, match=rf"nan.safetensors.*not finite \({key}\)"):
        generate.main(generate.parse_args(argv))
    assert not (tmp_path / "samples").exists()  # refused before anything is written
    # a training .pt: the weights asked for are checked (the EMA by default, --init-from reads both)
    torch.save({"model": load_file(str(tiny_reg_ckpt)), "ema": sd, "steps": 1}, tmp_path / "nan.pt")
    with pytest.raises(NonFiniteCheckpointError, match=rf"the ema weights are not finite \({key}\)"):
        read_weights(str(tmp_path / "nan.pt"))
    assert read_weights(str(tmp_path / "nan.pt"), use_ema=False)[0].keys() == sd.keys()
    assert issubclass(NonFiniteCheckpointError, UserError)  # one line at the entry points


def test_sweep_computes_no_fid_from_a_non_finite_image(tiny_reg_ckpt, tmp_path, monkeypatch):
    from evaluations import evaluator

    monkeypatch.setattr(evaluator, "build_inception", lambda weights, device, verbose=True: FakeInception())
    monkeypatch.setattr(evaluator, "compute_metrics", fake_metrics)
    load_generator = sweep.load_generator

    def patched(*args, **kwargs):
        loaded = load_generator(*args, **kwargs)
        return loaded._replace(model=nan_for_second_row_of_last_batch(loaded.model))

    monkeypatch.setattr(sweep, "load_generator", patched)
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    argv = ["--ckpt", str(tiny_reg_ckpt), "--ref-batch", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "out"),
            "--cfg-scale", "1", "--num-steps", "3", "--num-samples", "6", "--per-proc-batch-size", "4",
            "--device", "cpu", "--inception-weights", "random", "--eval-batch-size", "4"]
    with pytest.raises(NonFiniteSampleError, match=rf"^image {BAD_INDEX} is not finite"):
        sweep.main(sweep.parse_args(argv))
    assert not list((tmp_path / "out" / "settings").glob("*.json"))
    assert not (tmp_path / "out" / "results.json").exists()


def test_in_training_eval_logs_no_fid_from_a_non_finite_image(monkeypatch):
    from evaluations.during_training import InTrainingEval

    class Log:
        lines: list[str] = []
        records: list[dict] = []

        def info(self, text):
            self.lines.append(text)

        def metrics(self, record):
            self.records.append(record)

    class Acc:
        num_processes, is_main_process = 1, True

        def wait_for_everyone(self):
            pass

    ev = InTrainingEval.__new__(InTrainingEval)
    ev.args, ev.accelerator, ev.log, ev.done = argparse.Namespace(), Acc(), Log(), set()

    def bad(ema, step=None):
        raise NonFiniteSampleError("image 3 is not finite (NaN or inf in its latents)")

    monkeypatch.setattr(ev, "sample_features", bad)
    assert ev.run(None, step=10) is None
    assert ev.log.records == [] and "step 10 skipped, no FID logged: image 3 is not finite" in ev.log.lines[0]
    assert 10 in ev.done


def test_training_sample_grid_writes_no_black_grid(tmp_path, monkeypatch):
    import train
    from reg import seeded_images

    def bad(*args, **kwargs):
        raise NonFiniteSampleError("image 0 is not finite (NaN or inf in its latents)")
        yield

    monkeypatch.setattr(seeded_images, "generate_images", bad)
    lines = []
    log = type("Log", (), {"info": lambda self, text: lines.append(text)})()
    config = {"vae": "pixel-unshuffle", "num_classes": 4, "path_type": "linear", "latents_scale": 1.0}
    sample = train.make_preview_writer(argparse.Namespace(seed=0, report_to="none"), config, torch.device("cpu"), log)
    sample(None, 4, tmp_path, None)
    assert not (tmp_path / "samples").exists() and "sample grid at step 4 skipped: image 0" in lines[0]
