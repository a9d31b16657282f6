"""Shared test set-up: one thread per test process, and every fixture that more than one test file uses (a
fresh accelerate state, train.py's tiny data and FID reference, the FLOP-count memo, sweep.py's folder, a tiny
REG checkpoint). No fixture here is autouse: a test or module asks for each by name. Plain helpers shared by
test files are in helpers.py.

pytest runs on two workers (pytest.ini: -n 2) and the CI machine has two cores. Tiny tensors run as fast on
one thread, and far faster when the cores are contended (OpenMP threads spin against the other worker), so
each worker computes on one thread, and so do the scripts the tests launch (OMP_NUM_THREADS is inherited).
"""
import os

import pytest
import torch

# Never reach for the network in tests: hub look-ups must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps a process-wide singleton; each in-process train.main() or Accelerator gets a fresh one."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------- train.py's tiny runs

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """64 synthetic 32x32 images (4 classes) encoded with the weight-free pixel-unshuffle codec (one per test
    module; tests that change the data change a copy)."""
    from helpers import encoded_synthetic_data
    return encoded_synthetic_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def eval_ref(data_dir, tmp_path_factory):
    """An ADM-style reference batch for --eval-ref: the first 8 images of data_dir as uint8 NHWC."""
    import numpy as np
    from PIL import Image
    images = np.stack([np.asarray(Image.open(f).convert("RGB"))
                       for f in sorted((data_dir / "imagenet_32_vae").rglob("*.png"))[:8]])
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    np.savez(path, arr_0=images)
    return path


@pytest.fixture(scope="module")
def flops_counted_once_per_architecture():
    """train.main counts the FLOPs per image on meta tensors, ~1 s of Python meta kernels per run; the runs
    of a module share a few architectures, so the count is kept per architecture (the module reprs: every
    layer and its shape). Not autouse: a module of in-process train.main runs asks for it, with
    `pytestmark = pytest.mark.usefixtures(...)` or on the test. tests/test_train_step.py checks the count itself."""
    import train
    real, cache = train.training_flops_per_image, {}

    def memo(model, encoders, *, cls_dim, resolution, backward=True):
        key = (repr(model), tuple(repr(e) for e in encoders), cls_dim, resolution, backward)
        if key not in cache:
            cache[key] = real(model, encoders, cls_dim=cls_dim, resolution=resolution, backward=backward)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "training_flops_per_image", memo)
        yield


# ----------------------------------------------------------------------------- sweep.py

@pytest.fixture
def sweep_setup(tmp_path, monkeypatch):
    """A folder for helpers.run_sweep: a tiny REG checkpoint (ema.safetensors) and an 8-image reference batch
    (ref.npz); the evaluator's Inception network and metrics are fast stand-ins (helpers.FakeInception,
    helpers.fake_metrics) for the rest of the test."""
    import numpy as np

    from evaluations import evaluator
    from helpers import FakeInception, fake_metrics, save_tiny_reg_checkpoint
    monkeypatch.setattr(evaluator, "build_inception", lambda weights, device, verbose=True: FakeInception())
    monkeypatch.setattr(evaluator, "compute_metrics", fake_metrics)
    save_tiny_reg_checkpoint(tmp_path / "ema.safetensors", perturb=0.05)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    return tmp_path


# ----------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def tiny_reg_ckpt(tmp_path_factory):
    """helpers.save_tiny_reg_checkpoint with its output layers moved (the samples are not constant), as
    ema_0000010.safetensors and its .json: one per test module."""
    from helpers import save_tiny_reg_checkpoint
    return save_tiny_reg_checkpoint(tmp_path_factory.mktemp("ckpt") / "ema_0000010.safetensors", perturb=0.05)


# ----------------------------------------------------------------------------- stand-ins for pretrained networks

@pytest.fixture(scope="module")
def random_inception():
    """The evaluator's Inception-v3 with seeded random weights (warnings silenced): one per test module."""
    import warnings

    from evaluations.inception import build_inception
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_inception("random", "cpu", verbose=False)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """helpers.save_tiny_vae's tiny AutoencoderKL (seed 0), saved with save_pretrained: one per test module."""
    from helpers import save_tiny_vae
    return save_tiny_vae(str(tmp_path_factory.mktemp("vae") / "tiny-vae"), seed=0)


def pytest_collection_modifyitems(config, items):
    """The slow tests first, the rest in file order (a stable sort): under -n 2 the longest tests start early,
    one per worker, instead of some of them landing at the end of the run while the other worker is idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
