"""Tests for evaluations/inception.py: the Inception wiring (sFID hook, unbiased logits), seeded
random weights, local weights files and the environment variable, and the offline error that says
what to fetch (also through `python -m evaluations.evaluator`).

CPU only: every image goes through a 299x299 Inception-v3 forward, so there are two of them.
"""
from __future__ import annotations

import runpy
import sys
import urllib.error
import warnings

import numpy as np
import pytest
import torch

from evaluations import inception
from evaluations.common import InceptionWeightsError

# ----------------------------------------------------------------------------------------------
# Inception wiring, weights
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_images():
    return torch.from_numpy(np.random.default_rng(10).integers(0, 256, (2, 3, 40, 48), dtype=np.uint8))


@pytest.fixture(scope="module")
def forward(random_inception, two_images):
    """One forward (about a second per image on CPU), with Mixed_6d.branch1x1's raw output captured."""
    raw = {}
    handle = random_inception.net.Mixed_6d.branch1x1.register_forward_hook(
        lambda m, i, o: raw.setdefault("x", o.clone()))
    try:
        pool, spatial, logits = random_inception(two_images)
    finally:
        handle.remove()
    return pool, spatial, logits, raw["x"]


def test_spatial_features_are_mixed_6d_branch1x1_channels_last(forward):
    pool, spatial, logits, raw = forward
    x = raw.numpy()
    assert x.shape == (2, 192, 17, 17)  # 17x17 at 299 input
    assert x.min() >= 0  # after BN + ReLU
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    s = spatial.numpy()
    # TF's NHWC flatten: feature index (h * 17 + w) * 7 + c holds channel c at (h, w).
    for n, h, w, c in [(0, 0, 0, 0), (0, 0, 0, 6), (1, 0, 1, 0), (1, 5, 11, 3), (0, 16, 16, 6), (1, 16, 0, 2)]:
        assert s[n, (h * 17 + w) * 7 + c] == x[n, c, h, w]
    np.testing.assert_array_equal(s, x[:, :7].transpose(0, 2, 3, 1).reshape(2, -1))
    assert not np.allclose(s, x[:, :7].reshape(2, -1))  # a channels-first flatten would fail


def test_logits_are_pool_times_fc_weight_without_bias(random_inception, forward):
    pool, _, logits, _ = forward
    w, b = random_inception.net.fc.weight, random_inception.net.fc.bias
    np.testing.assert_allclose(logits.numpy(), (pool.double() @ w.double().T).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits.numpy(), (pool @ w.T + b).numpy(), atol=1e-3)  # 'logits' (biased) differs
    np.testing.assert_allclose(random_inception.logits_from_pool(pool.numpy()), logits.numpy(), rtol=1e-5, atol=1e-5)


def _same_weights(a: inception.InceptionV3, b: inception.InceptionV3) -> bool:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_weights_are_deterministic_and_loud(random_inception):
    with pytest.warns(UserWarning, match="RANDOM INCEPTION WEIGHTS"):
        again = inception.build_inception("random", "cpu", verbose=False)
    assert again.random_weights and _same_weights(again, random_inception)
    assert random_inception.net.Conv2d_1a_3x3.conv.weight.std() > 0.05  # really re-initialised (fan-in normal)


def test_local_weights_file_and_env_var(random_inception, tmp_path, monkeypatch):
    path = tmp_path / inception.INCEPTION_FILENAME
    torch.save(random_inception.net.state_dict(), path)
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    assert inception.resolve_weights(None) == str(path)
    assert inception.resolve_weights("random") == "random"  # the flag beats the environment
    loaded = inception.build_inception(inception.resolve_weights(None), "cpu", verbose=False)
    assert not loaded.random_weights and loaded.weights == str(path) and _same_weights(loaded, random_inception)

    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(InceptionWeightsError, match="expected Inception-v3 weights"):
        inception.build_inception(str(tmp_path / "wrong.pth"), "cpu", verbose=False)
    with pytest.raises(InceptionWeightsError, match="does not exist"):
        inception.build_inception(str(tmp_path / "missing.pth"), "cpu", verbose=False)


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """An empty torch hub dir and a download function that fails like a machine without network
    (no request leaves this machine); returns the list of attempted URLs."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    attempts = []

    def no_network(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return attempts


def test_missing_weights_offline_says_what_to_fetch(tmp_path, offline):
    expected_path = tmp_path / "torch_home" / "hub" / "checkpoints" / inception.INCEPTION_FILENAME
    assert inception.default_weights_path() == str(expected_path)
    with pytest.raises(InceptionWeightsError) as info:
        inception.build_inception(None, "cpu", verbose=False)
    msg = str(info.value)
    assert offline == [inception.INCEPTION_URL]
    for part in (inception.INCEPTION_FILENAME, inception.INCEPTION_URL, str(expected_path), "--inception-weights", inception.WEIGHTS_ENV):
        assert part in msg
    assert info.value.__suppress_context__  # no urllib traceback chained underneath


def test_missing_weights_cli_has_no_traceback(tmp_path, offline, monkeypatch, capsys):
    """`python -m evaluations.evaluator` (its __main__ block, run in-process): exit 2, a plain message."""
    rng = np.random.default_rng(11)
    for name in ("a.npz", "b.npz"):
        np.savez(tmp_path / name, rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    argv = ["evaluator", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    with warnings.catch_warnings(), pytest.raises(SystemExit) as info:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
        runpy.run_module("evaluations.evaluator", run_name="__main__")
    err = capsys.readouterr().err
    assert info.value.code == 2 and offline == [inception.INCEPTION_URL]
    assert "Traceback" not in err and "error: Inception weights are not at" in err
    assert inception.INCEPTION_FILENAME in err and str(tmp_path / "torch_home" / "hub" / "checkpoints") in err
