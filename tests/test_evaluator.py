"""Tests for evaluations/evaluator.py: metric functions against plain NumPy versions of
ADM's formulas, the Inception wiring (sFID hook, unbiased logits), streaming npz reading, the CLI
on tiny npz files with random Inception weights, and every bad-input error.

CPU only. Image counts stay tiny: every image goes through a 299x299 Inception-v3 forward.
"""
from __future__ import annotations

import hashlib
import json
import os
import runpy
import sys
import urllib.error
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from evaluations import evaluator as ev

# ----------------------------------------------------------------------------------------------
# Plain NumPy versions of ADM's formulas (guided-diffusion/evaluations/evaluator.py).
# ----------------------------------------------------------------------------------------------

def np_fid(mu1, s1, mu2, s2):
    """tr sqrt(S1 S2) from the eigenvalues of S1 S2 (real, >= 0 for PSD S1, S2): no sqrtm involved."""
    ev_ = np.linalg.eigvals(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev_, 0, None)).sum()


def np_inception_score(logits, split_size):
    """ADM: tf.nn.softmax in float32, then improved-gan's KL formula per contiguous split."""
    logits = logits.astype(np.float32)
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def np_distances(u, v):
    """ADM's DistanceBlock: max(|u|^2 - 2 u.v + |v|^2, 0) in fp16, fp32 if anything is non-finite."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):  # fp16 overflow is the fallback's trigger
        nu = (u16 * u16).astype(np.float32).sum(1).astype(np.float16)
        nv = (v16 * v16).astype(np.float32).sum(1).astype(np.float16)
        uv = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d = np.maximum(nu[:, None] - 2 * uv + nv[None, :], np.float16(0))
    if np.isfinite(d).all():
        return d.astype(np.float32)
    u, v = u.astype(np.float32), v.astype(np.float32)
    return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0)


def np_precision_recall(ref, sample, k=3):
    """ADM's ManifoldEstimator in one block: radius = np.partition(row, k)[k] (self included), `<=`."""
    r_ref = np.partition(np_distances(ref, ref), k, axis=1)[:, k]
    r_sam = np.partition(np_distances(sample, sample), k, axis=1)[:, k]
    d = np_distances(ref, sample)
    precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
    recall = np.mean(np.any(d <= r_sam[None, :], axis=1))
    return float(precision), float(recall)


def random_stats(rng, n, d, shift=0.0):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift
    return ev.compute_statistics(x)


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------

def adm_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM's FIDStatistics.frechet_distance (guided-diffusion evaluations/evaluator.py), with scipy's sqrtm."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def feature_stats(rng, n, d, shift=0.0):
    """Inception-like features: a low-rank part plus noise, so some directions are nearly flat."""
    x = rng.standard_normal((n, 64)) @ rng.standard_normal((64, d)) * 0.1 + rng.standard_normal((n, d)) * 0.5
    return ev.compute_statistics(x + shift)


def test_frechet_distance_matches_numpy():
    rng = np.random.default_rng(0)
    mu1, s1 = random_stats(rng, 400, 48)
    mu2, s2 = random_stats(rng, 300, 48, shift=0.5)
    ours, ref = ev.frechet_distance(mu1, s1, mu2, s2), np_fid(mu1, s1, mu2, s2)
    assert ref > 1.0
    assert abs(ours - ref) <= 1e-6 * ref


# full rank (Cholesky of S1); S1 singular (S2's factor); both singular (eigh)
@pytest.mark.parametrize("n1, n2", [(600, 500), (150, 600), (150, 200)])
def test_frechet_distance_equals_adm_sqrtm(n1, n2):
    rng = np.random.default_rng(n1)
    (mu1, s1), (mu2, s2) = feature_stats(rng, n1, 256), feature_stats(rng, n2, 256, shift=0.02)
    ref = adm_fid(mu1, s1, mu2, s2)
    assert ref > 1.0
    assert abs(ev.frechet_distance(mu1, s1, mu2, s2, device="cpu") - ref) <= 1e-6 * ref
    assert abs(ev.frechet_distance(mu2, s2, mu1, s1, device="cpu") - ref) <= 1e-6 * ref


@pytest.mark.skipif(not os.environ.get("REG_FULL_SIZE_TESTS"),
                    reason="scipy's sqrtm at 2048-d takes ~1 min per call on 2 cores; set REG_FULL_SIZE_TESTS=1")
@pytest.mark.parametrize("n1, n2", [(5000, 4000), (1000, 1500)])  # full rank; near-singular (N < 2048)
def test_frechet_distance_equals_adm_sqrtm_full_size(n1, n2):
    import time
    rng = np.random.default_rng(n1)
    (mu1, s1), (mu2, s2) = feature_stats(rng, n1, 2048), feature_stats(rng, n2, 2048, shift=0.05)
    t0 = time.perf_counter()
    ref = adm_fid(mu1, s1, mu2, s2)
    t1 = time.perf_counter()
    ours = ev.frechet_distance(mu1, s1, mu2, s2, device="cpu")
    t2 = time.perf_counter()
    print(f"\n2048-d, n={n1},{n2}: sqrtm {t1 - t0:.1f} s, ours {t2 - t1:.1f} s, rel diff {abs(ours - ref) / ref:.2e}")
    assert abs(ours - ref) <= 1e-6 * ref


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    mu, s = random_stats(rng, 500, 64)
    assert abs(ev.frechet_distance(mu, s, mu, s)) < 1e-6 * np.trace(s)


@pytest.mark.parametrize("n2", [200, 12])  # S2 full rank: its factor is used; S2 singular too: eigh of S1
def test_frechet_distance_singular_covariances(n2):
    """Fewer samples than dimensions: S1 is singular and its Cholesky factorisation fails."""
    rng = np.random.default_rng(2)
    mu1, s1 = random_stats(rng, 10, 32)
    mu2, s2 = random_stats(rng, n2, 32, shift=0.3)
    assert torch.linalg.cholesky_ex(torch.from_numpy(s1))[1].item() != 0
    assert (torch.linalg.cholesky_ex(torch.from_numpy(s2))[1].item() != 0) == (n2 < 32)
    ref = adm_fid(mu1, s1, mu2, s2)
    assert abs(ev.frechet_distance(mu1, s1, mu2, s2, device="cpu") - ref) <= 1e-6 * ref


def test_frechet_distance_eps_fallback(monkeypatch):
    """Non-finite trace -> retry with 1e-6 on both diagonals (and only then), as ADM does."""
    rng = np.random.default_rng(2)
    mu1, s1 = random_stats(rng, 200, 16)
    mu2, s2 = random_stats(rng, 200, 16, shift=1.0)
    real, calls = ev._trace_sqrt_product, []

    def nan_then_real(a, b, device, factor1=None):
        calls.append((a, b))
        return (float("nan"), 0.0) if len(calls) == 1 else real(a, b, device)

    monkeypatch.setattr(ev, "_trace_sqrt_product", nan_then_real)
    with pytest.warns(UserWarning, match="adding 1e-06"):
        value = ev.frechet_distance(mu1, s1, mu2, s2)
    off = np.eye(16) * 1e-6
    np.testing.assert_allclose(calls[1][0], s1 + off)
    np.testing.assert_allclose(calls[1][1], s2 + off)
    assert abs(value - adm_fid(mu1, s1 + off, mu2, s2 + off)) < 1e-6 * value


def test_frechet_distance_rejects_non_psd_covariance():
    rng = np.random.default_rng(3)
    mu, s = random_stats(rng, 100, 8)
    bad = s - 2 * np.max(np.linalg.eigvalsh(s)) * np.outer(np.eye(8)[0], np.eye(8)[0])
    with pytest.raises(ev.EvalInputError, match="not positive semidefinite"):
        ev.frechet_distance(mu, bad, mu, s, device="cpu")
    with pytest.raises(ev.EvalInputError, match="not positive semidefinite"):
        ev.frechet_distance(mu, s, mu, bad, device="cpu")


def test_frechet_distance_rejects_nan_statistics():
    rng = np.random.default_rng(4)
    mu, s = random_stats(rng, 100, 8)
    bad = s.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ev.EvalInputError, match="sigma2 contains NaN"):
        ev.frechet_distance(mu, s, mu, bad)


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------

def test_inception_score_matches_numpy_with_contiguous_splits():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((70, 1008)) * 3).astype(np.float32)
    for split in (5000, 30, 7):  # one split; a partial last split; many splits
        ours, ref = ev.inception_score(logits, split), np_inception_score(logits, split)
        assert abs(ours - ref) <= 1e-6 * ref
    # Splits are contiguous blocks in file order: permuting the rows changes a split score.
    perm = rng.permutation(70)
    assert abs(ev.inception_score(logits[perm], 30) - ev.inception_score(logits, 30)) > 1e-4
    # Under one split the order does not matter.
    assert abs(ev.inception_score(logits[perm]) - ev.inception_score(logits)) < 1e-5


def test_inception_score_zero_probabilities_are_finite():
    """Float32 softmax underflows to exactly 0 here; ADM's 0*log(0) would be NaN, ours is the limit."""
    logits = np.zeros((4, 1008), np.float32)
    logits[np.arange(4), np.arange(4)] = 200.0  # one-hot in float32
    assert abs(ev.inception_score(logits) - 4.0) < 1e-4  # 4 distinct confident classes -> IS = 4


# ----------------------------------------------------------------------------------------------
# Precision / recall
# ----------------------------------------------------------------------------------------------

def test_precision_recall_matches_numpy_on_random_features():
    # Points near a 16-d subspace of R^2048 (like Inception features, |x|^2 ~ 1e3: fp16 range),
    # the samples slightly too spread out: precision and recall both strictly between 0 and 1.
    rng = np.random.default_rng(6)
    basis = rng.standard_normal((16, 2048)) * 0.15
    ref = (rng.standard_normal((120, 16)) @ basis + rng.standard_normal((120, 2048)) * 0.05).astype(np.float32)
    sample = (rng.standard_normal((90, 16)) @ basis * 1.15 + rng.standard_normal((90, 2048)) * 0.05).astype(np.float32)
    expected = np_precision_recall(ref, sample)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert ev.precision_recall(ref, sample, device="cpu") == pytest.approx(expected, abs=1e-6)
    # Blocking (ADM: 10000 x 10000) must not change anything.
    assert ev.precision_recall(ref, sample, block_size=50, device="cpu") == pytest.approx(expected, abs=1e-6)


def test_precision_recall_definition_exact_integers():
    """Integer features: every fp16 step is exact, so compare with the float64 textbook definition
    (radius = 4th smallest distance with self, `<=`), ties included."""
    rng = np.random.default_rng(0)
    ref = rng.integers(-3, 4, (40, 6)).astype(np.float32)
    sample = rng.integers(-2, 5, (30, 6)).astype(np.float32)  # shifted: precision, recall < 1
    k = 3

    def d2(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_sam = np.sort(d2(sample, sample), axis=1)[:, k]
    precision = np.mean([any(d2(s[None], ref)[0] <= r_ref) for s in sample])
    recall = np.mean([any(d2(r[None], sample)[0] <= r_sam) for r in ref])
    strict = (np.mean([any(d2(s[None], ref)[0] < r_ref) for s in sample]),
              np.mean([any(d2(r[None], sample)[0] < r_sam) for r in ref]))
    assert strict != (precision, recall)  # ties on the radius occur here, so `<` vs `<=` is tested
    for block in (10000, 7):
        got = ev.precision_recall(ref, sample, k=k, block_size=block, device="cpu")
        assert got == pytest.approx((precision, recall), abs=1e-12)
    # k is a parameter (k=1: the 2nd smallest distance, self included).
    expected_k1 = np_precision_recall(ref, sample, k=1)
    assert ev.precision_recall(ref, sample, k=1, device="cpu") == pytest.approx(expected_k1, abs=1e-12)


def test_precision_recall_fp32_fallback_on_fp16_overflow():
    """|x|^2 > 65504 overflows fp16: ADM recomputes the block in fp32."""
    rng = np.random.default_rng(8)
    ref = (rng.integers(-3, 4, (25, 16)) * 300).astype(np.float32)
    sample = (rng.integers(-3, 4, (20, 16)) * 300).astype(np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite((ref.astype(np.float16) ** 2).sum(1)).all()
    d = ev.squared_distances(torch.from_numpy(ref), torch.from_numpy(sample)).numpy()
    assert np.isfinite(d).all()
    np.testing.assert_array_equal(d, np_distances(ref, sample))
    assert ev.precision_recall(ref, sample, device="cpu") == pytest.approx(np_precision_recall(ref, sample))


def test_precision_recall_needs_k_plus_one_points():
    rng = np.random.default_rng(9)
    with pytest.raises(ev.EvalInputError, match="at least 4"):
        ev.precision_recall(rng.standard_normal((10, 8)), rng.standard_normal((3, 8)), k=3, device="cpu")


# ----------------------------------------------------------------------------------------------
# Inception wiring, weights
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ev.build_inception("random", "cpu", verbose=False)


@pytest.fixture(scope="module")
def two_images():
    return torch.from_numpy(np.random.default_rng(10).integers(0, 256, (2, 3, 40, 48), dtype=np.uint8))


@pytest.fixture(scope="module")
def forward(model, two_images):
    """One forward (about a second per image on CPU), with Mixed_6d.branch1x1's raw output captured."""
    raw = {}
    handle = model.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: raw.setdefault("x", o.clone()))
    try:
        pool, spatial, logits = model(two_images)
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


def test_logits_are_pool_times_fc_weight_without_bias(model, forward):
    pool, _, logits, _ = forward
    w, b = model.net.fc.weight, model.net.fc.bias
    np.testing.assert_allclose(logits.numpy(), (pool.double() @ w.double().T).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits.numpy(), (pool @ w.T + b).numpy(), atol=1e-3)  # 'logits' (biased) differs
    np.testing.assert_allclose(model.logits_from_pool(pool.numpy()), logits.numpy(), rtol=1e-5, atol=1e-5)


def _same_weights(a: ev.InceptionV3, b: ev.InceptionV3) -> bool:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_weights_are_deterministic_and_loud(model):
    with pytest.warns(UserWarning, match="RANDOM INCEPTION WEIGHTS"):
        again = ev.build_inception("random", "cpu", verbose=False)
    assert again.random_weights and _same_weights(again, model)
    assert model.net.Conv2d_1a_3x3.conv.weight.std() > 0.05  # really re-initialised (fan-in normal)


def test_local_weights_file_and_env_var(model, tmp_path, monkeypatch):
    path = tmp_path / ev.INCEPTION_FILENAME
    torch.save(model.net.state_dict(), path)
    monkeypatch.setenv(ev.WEIGHTS_ENV, str(path))
    assert ev.resolve_weights(None) == str(path)
    assert ev.resolve_weights("random") == "random"  # the flag beats the environment
    loaded = ev.build_inception(ev.resolve_weights(None), "cpu", verbose=False)
    assert not loaded.random_weights and loaded.weights == str(path) and _same_weights(loaded, model)

    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ev.InceptionWeightsError, match="expected Inception-v3 weights"):
        ev.build_inception(str(tmp_path / "wrong.pth"), "cpu", verbose=False)
    with pytest.raises(ev.InceptionWeightsError, match="does not exist"):
        ev.build_inception(str(tmp_path / "missing.pth"), "cpu", verbose=False)


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """An empty torch hub dir and a download function that fails like a machine without network
    (no request leaves this machine); returns the list of attempted URLs."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(ev.WEIGHTS_ENV, raising=False)
    attempts = []

    def no_network(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return attempts


def test_missing_weights_offline_says_what_to_fetch(tmp_path, offline):
    expected_path = tmp_path / "torch_home" / "hub" / "checkpoints" / ev.INCEPTION_FILENAME
    assert ev.default_weights_path() == str(expected_path)
    with pytest.raises(ev.InceptionWeightsError) as info:
        ev.build_inception(None, "cpu", verbose=False)
    msg = str(info.value)
    assert offline == [ev.INCEPTION_URL]
    for part in (ev.INCEPTION_FILENAME, ev.INCEPTION_URL, str(expected_path), "--inception-weights", ev.WEIGHTS_ENV):
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
    assert info.value.code == 2 and offline == [ev.INCEPTION_URL]
    assert "Traceback" not in err and "error: Inception weights are not at" in err
    assert ev.INCEPTION_FILENAME in err and str(tmp_path / "torch_home" / "hub" / "checkpoints") in err


def test_ieee_fp32_switches_tf32_off_and_restores():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with ev.ieee_fp32():
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


# ----------------------------------------------------------------------------------------------
# In-memory API: FeatureAccumulator, batch_from_features, load_reference
# ----------------------------------------------------------------------------------------------

def test_feature_accumulator_equals_npz_path(model, tmp_path):
    """Images handed over in odd pieces and layouts give the npz path's features, bit for bit, in order."""
    images = np.random.default_rng(20).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "three.npz", images)
    expected = ev.extract_features(ev.NpzImageReader(str(tmp_path / "three.npz")), model, batch_size=2, verbose=False)
    acc = ev.FeatureAccumulator(model, batch_size=2)
    acc.add(torch.from_numpy(images[:1]).permute(0, 3, 1, 2))  # torch NCHW
    acc.add(images[1:2])                                        # NumPy NHWC
    acc.add(torch.from_numpy(images[2:]))                       # torch NHWC
    assert len(acc) == 3
    got = acc.features()
    assert sorted(got) == ["logits", "pool", "spatial"]
    for key in got:
        assert got[key].shape == expected[key].shape and got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], expected[key])
    batch = acc.finish("in-memory")
    mu, sigma = ev.compute_statistics(expected["pool"])
    np.testing.assert_array_equal(batch.mu, mu)
    np.testing.assert_array_equal(batch.sigma, sigma)
    assert batch.info.path == "in-memory" and batch.info.num_images == 3 and batch.info.image_shape == (16, 16, 3)
    # Rows are images in add() order: the first row is image 0's features.
    assert not np.array_equal(got["pool"][0], got["pool"][1])


@pytest.mark.parametrize("images, pattern", [
    (torch.zeros(2, 3, 8, 8), "dtype torch.float32, expected torch.uint8"),
    (np.zeros((2, 3, 8, 8), np.uint8), r"expected \(N, H, W, 3\)"),
    (torch.zeros(2, 8, 8, dtype=torch.uint8), "expected"),
    (torch.zeros(2, 3, 8, 3, dtype=torch.uint8), "ambiguous"),
    (np.zeros((2, 8, 8, 3), np.float64), "dtype float64, expected uint8"),
])
def test_feature_accumulator_refuses_wrong_images(model, images, pattern):
    with pytest.raises(ev.EvalInputError, match=pattern):
        ev.FeatureAccumulator(model).add(images)


def test_feature_accumulator_refuses_mixed_resolutions_and_empty(model):
    acc = ev.FeatureAccumulator(model, batch_size=4)
    acc.add(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ev.EvalInputError, match="16x16 after 8x8"):
        acc.add(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ev.EvalInputError, match="no images"):
        ev.FeatureAccumulator(model).features()


def test_batch_from_features_matches_statistics_and_checks_shapes():
    rng = np.random.default_rng(21)
    pool = rng.standard_normal((6, 2048)).astype(np.float32)
    spatial = rng.standard_normal((6, 2023)).astype(np.float32)
    logits = rng.standard_normal((6, 1008)).astype(np.float32)
    b = ev.batch_from_features(torch.from_numpy(pool), spatial, logits, name="gathered")
    np.testing.assert_array_equal(b.mu_s, ev.compute_statistics(spatial)[0])
    np.testing.assert_array_equal(b.sigma, ev.compute_statistics(pool)[1])
    np.testing.assert_array_equal(b.logits, logits)
    with pytest.raises(ev.EvalInputError, match="different numbers of images"):
        ev.batch_from_features(pool, spatial[:5], logits)
    with pytest.raises(ev.EvalInputError, match=r"'spatial' features have shape \(6, 2048\)"):
        ev.batch_from_features(pool, pool, logits)


def _stats_file(path, seed, model):
    """A --save-stats file (no images), so load_reference runs no Inception forward."""
    feats = np.random.default_rng(seed).standard_normal((8, 2048)).astype(np.float32)
    batch = ev.batch_from_features(feats, feats[:, :2023], None, name=str(path))
    ev.save_statistics(str(path), batch, model)
    return batch


def test_load_reference_cache(model, tmp_path):
    ref_path, cache = tmp_path / "ref.npz", tmp_path / "cache" / "ref_stats.npz"
    batch = _stats_file(ref_path, 22, model)
    first = ev.load_reference(str(ref_path), model, cache_path=str(cache), verbose=False)
    assert cache.is_file() and not list(cache.parent.glob(".*.tmp"))
    meta = ev.read_stored_meta(str(cache))
    assert meta["source"] == "ref.npz" and meta["source_size"] == os.path.getsize(ref_path)
    assert meta["inception_weights_id"] == model.weights_id == "random"
    cached = ev.load_reference(str(ref_path), model, cache_path=str(cache), verbose=False)
    assert cached.info.path == str(cache)  # read from the cache, not recomputed
    for a in (first, cached):
        np.testing.assert_array_equal(a.mu, batch.mu)
        np.testing.assert_array_equal(a.pool, batch.pool)

    # Another source under the same name (new content, new mtime): refused, cache kept.
    os.utime(ref_path, ns=(1, 1))
    with pytest.raises(ev.EvalInputError, match="ref_stats.npz was not made from .*ref.npz.*source_mtime_ns"):
        ev.load_reference(str(ref_path), model, cache_path=str(cache), verbose=False)
    assert cache.is_file()


def test_load_reference_cache_refuses_other_weights(model, tmp_path, monkeypatch):
    ref_path, cache = tmp_path / "ref.npz", tmp_path / "ref_stats.npz"
    _stats_file(ref_path, 23, model)
    ev.load_reference(str(ref_path), model, cache_path=str(cache), verbose=False)
    monkeypatch.setattr(model, "weights_id", "sha256:" + "0" * 64)
    with pytest.raises(ev.EvalInputError, match="inception_weights_id: cache 'random' vs now 'sha256:0000"):
        ev.load_reference(str(ref_path), model, cache_path=str(cache), verbose=False)


# ----------------------------------------------------------------------------------------------
# Streaming npz reading
# ----------------------------------------------------------------------------------------------

def test_npz_reader_streams_stored_and_compressed(tmp_path):
    rng = np.random.default_rng(12)
    images = rng.integers(0, 256, (11, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images, labels=np.arange(11))  # zip64 local headers (numpy)
    np.savez_compressed(tmp_path / "packed.npz", images)
    for name, mapped in (("plain.npz", True), ("packed.npz", False)):
        reader = ev.NpzImageReader(str(tmp_path / name))
        assert reader.memory_mapped == mapped and len(reader) == 11 and reader.shape == (11, 5, 6, 3)
        batches = list(reader.batches(4))
        assert [len(b) for b in batches] == [4, 4, 3]
        np.testing.assert_array_equal(np.concatenate(batches), images)
        if mapped:  # views into the file, not copies of the whole array
            assert isinstance(batches[0].base, np.memmap) or isinstance(batches[0], np.memmap)


# ----------------------------------------------------------------------------------------------
# Bad inputs: clear errors before any expensive work
# ----------------------------------------------------------------------------------------------

def _run(argv):
    return ev.main(ev.parse_args(list(argv) + ["--inception-weights", "random", "--device", "cpu", "--quiet"]))


@pytest.fixture()
def good_npz(tmp_path):
    path = tmp_path / "good.npz"
    np.savez(path, np.random.default_rng(13).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    return str(path)


@pytest.mark.parametrize("array, pattern", [
    (np.random.default_rng(0).random((5, 8, 8, 3), dtype=np.float32), "dtype float32, expected uint8"),
    (np.zeros((5, 3, 8, 8), np.uint8), "looks channels-first"),
    (np.zeros((5, 8, 8), np.uint8), r"expected \(N, H, W, 3\)"),
    (np.zeros((5, 8, 8, 4), np.uint8), "3 RGB channels"),
])
def test_bad_image_arrays(tmp_path, good_npz, array, pattern):
    bad = tmp_path / "bad.npz"
    np.savez(bad, array)
    with pytest.raises(ev.EvalInputError, match=pattern) as info:
        _run([good_npz, str(bad)])
    assert "bad.npz" in str(info.value)


def test_missing_arr_0(tmp_path, good_npz):
    bad = tmp_path / "nokey.npz"
    np.savez(bad, images=np.zeros((5, 8, 8, 3), np.uint8))
    with pytest.raises(ev.EvalInputError, match=r"no 'arr_0' array .*found \['images'\]"):
        _run([str(bad), good_npz])


def test_too_few_images_for_precision_recall(tmp_path, good_npz):
    small = tmp_path / "three.npz"
    np.savez(small, np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ev.EvalInputError, match="three.npz: 3 images, but precision/recall with k=3 needs at least 4"):
        _run([good_npz, str(small)])


def test_nan_stored_statistics(tmp_path, good_npz):
    bad = tmp_path / "nanstats.npz"
    sigma = np.eye(2048)
    sigma[0, 0] = np.nan
    np.savez(bad, np.zeros((5, 8, 8, 3), np.uint8), mu=np.zeros(2048), sigma=sigma,
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with pytest.raises(ev.EvalInputError, match="nanstats.npz: stored 'sigma' contains NaN"):
        _run([str(bad), good_npz])


def test_incomplete_stored_statistics(tmp_path, good_npz):
    bad = tmp_path / "partial.npz"
    np.savez(bad, np.zeros((5, 8, 8, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ev.EvalInputError, match=r"not \['mu_s', 'sigma_s'\]"):
        _run([str(bad), good_npz])


def test_cli_argument_forms(good_npz):
    a = ev.parse_args(["R.npz", "S.npz", "--save-path", "o.json"])
    b = ev.parse_args(["--ref_batch", "R.npz", "--sample_batch", "S.npz", "--save_path", "o.json"])
    assert (a.ref_batch, a.sample_batch, a.save_path) == (b.ref_batch, b.sample_batch, b.save_path) \
        == ("R.npz", "S.npz", "o.json")
    assert ev.parse_args(["R.npz", "--save-stats", "r.npz"]).sample_batch is None
    with pytest.raises(SystemExit):
        ev.parse_args(["R.npz"])  # one batch only makes sense with --save-stats


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _member_data_start(path, member):
    import struct
    import zipfile
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def test_corrupt_stored_member_fails_crc(tmp_path):
    # Large enough that opening the member (header only) does not read it whole through zipfile.
    images = np.random.default_rng(30).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    path = tmp_path / "flipped.npz"
    np.savez(path, images)
    start, size = _member_data_start(path, "arr_0.npy")
    _flip_byte(path, start + size - 5)  # inside the last image
    reader = ev.NpzImageReader(str(path))
    assert reader.memory_mapped
    with pytest.raises(ev.EvalInputError, match=r"flipped.npz: member arr_0.npy fails its CRC-32 check"):
        list(reader.batches(4))


def test_corrupt_compressed_member_is_an_error(tmp_path):
    images = np.random.default_rng(31).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    path = tmp_path / "packed.npz"
    np.savez_compressed(path, images)
    start, size = _member_data_start(path, "arr_0.npy")
    _flip_byte(path, start + size // 2)
    with pytest.raises(ev.EvalInputError, match=r"packed.npz: member arr_0.npy (is corrupt|fails its CRC-32)"):
        list(ev.NpzImageReader(str(path)).batches(4))


def test_corrupt_stored_statistics_member_is_an_error(tmp_path):
    path = tmp_path / "stats.npz"
    np.savez(path, np.zeros((5, 8, 8, 3), np.uint8), mu=np.ones(2048), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    start, _ = _member_data_start(path, "mu.npy")
    _flip_byte(path, start + 200)
    with pytest.raises(ev.EvalInputError, match=r"stats.npz: corrupt npz member .*mu.npy"):
        ev.inspect_batch(str(path))


class _NoInception(Exception):
    pass


@pytest.fixture()
def no_inception(monkeypatch):
    """Fail the test if anything expensive starts: output checks must come first."""
    def refuse(*args, **kwargs):
        raise _NoInception("build_inception was reached")
    monkeypatch.setattr(ev, "build_inception", refuse)


def test_output_paths_checked_before_any_work(tmp_path, good_npz, no_inception):
    (tmp_path / "taken.json").mkdir()
    with pytest.raises(ev.EvalInputError, match="--save_path: .*taken.json is a directory"):
        _run([good_npz, good_npz, "--save_path", str(tmp_path / "taken.json")])
    # REG's form: the text file's name is save_path + the run's values; a folder there is refused too.
    (tmp_path / "exp25000.10.90.1cfg_cond_true.txt").mkdir()
    with pytest.raises(ev.EvalInputError, match="cfg_cond_true.txt is a directory"):
        _run([good_npz, good_npz, "--save_path", str(tmp_path / "exp"), "--cfg", "0.1", "--gh", "0.9",
              "--cls_cfg", "0.1", "--step", "0"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ev.EvalInputError, match="cannot create the folder .* is a file"):
        _run([good_npz, good_npz, "--save-stats", str(tmp_path / "file" / "stats.npz")])
    with pytest.raises(ev.EvalInputError, match="is the input batch"):
        _run([good_npz, good_npz, "--save-stats", good_npz])
    with pytest.raises(_NoInception):  # good paths get through to the network
        _run([good_npz, good_npz, "--save_path", str(tmp_path / "ok.json")])


def test_resolution_mismatch_warns(tmp_path, good_npz, no_inception):
    big = tmp_path / "big.npz"
    np.savez(big, np.zeros((5, 16, 16, 3), np.uint8))
    with pytest.warns(UserWarning, match=r"good.npz is 8x8 but samples .*big.npz are 16x16"), \
            pytest.raises(_NoInception):
        _run([good_npz, str(big)])


def test_help_shows_every_default(capsys):
    import re
    with pytest.raises(SystemExit) as info:
        ev.parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    options = re.findall(r"^  (--[\w-]+)", text, re.M)
    assert {"--ref_batch", "--sample_batch", "--save_path", "--cfg_cond", "--step", "--num_steps", "--cfg",
            "--cls_cfg", "--gh", "--save-stats", "--inception-weights", "--batch-size", "--device"} <= set(options)
    for flag in options:
        if flag == "--help":
            continue
        entry = re.search(rf"^  {flag}\b((?!\n  -).)*", text, re.M | re.S).group(0)
        assert "(default: " in " ".join(entry.split()), f"{flag} does not show its default"
    for flag, default in [("--cfg_cond", "1"), ("--step", "1"), ("--num_steps", "250"), ("--cfg", "1.0"),
                          ("--cls_cfg", "1.0"), ("--gh", "1.0"), ("--batch-size", "100")]:
        entry = re.search(rf"^  {flag}\b((?!\n  -).)*", text, re.M | re.S).group(0)
        assert f"(default: {default})" in " ".join(entry.split()), flag


def test_original_flags_parse_with_their_types():
    """REG's eval.sh line, verbatim apart from the paths."""
    a = ev.parse_args(["--ref_batch", "R.npz", "--sample_batch", "S.npz", "--save_path", "exp/checkpoints",
                       "--cfg_cond", "1", "--step", "4000000", "--num_steps", "250", "--cfg", "2.3",
                       "--cls_cfg", "2.3", "--gh", "0.85"])
    assert (a.cfg_cond, a.step, a.num_steps, a.cfg, a.cls_cfg, a.gh) == (1, 4000000, 250, 2.3, 2.3, 0.85)
    assert all(type(v) is t for v, t in [(a.cfg_cond, int), (a.step, int), (a.num_steps, int), (a.cfg, float),
                                         (a.cls_cfg, float), (a.gh, float)])
    # REG evaluations/evaluator.py main(): str() of each value, concatenated onto save_path.
    assert ev.original_text_path(a.save_path, a.num_steps, a.step, a.cfg, a.gh, a.cls_cfg, a.cfg_cond) \
        == "exp/checkpoints" + "250" + "4000000" + "2.3" + "0.85" + "2.3" + "cfg_cond_true.txt"
    assert ev.original_text_path("d/", 50, 7, 4.0, 1.0, 1.0, 0) == "d/5074.01.01.0cfg_cond_false.txt"


def test_evaluator_runs_as_a_script():
    """REG's eval.sh calls `python ./evaluations/evaluator.py ...` (not -m)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "evaluations/evaluator.py", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--cls_cfg" in out.stdout


# ----------------------------------------------------------------------------------------------
# The whole CLI on tiny npz files, random Inception weights
# ----------------------------------------------------------------------------------------------

class FrechetSpy:
    """scipy's sqrtm of a 2048x2048 matrix takes about a minute on a 2-core CPU, so the CLI tests
    record the Fréchet inputs instead (frechet_distance itself is tested above at small d)."""

    def __init__(self):
        self.calls = []

    def __call__(self, mu1, sigma1, mu2, sigma2, device=None, features1=None):
        self.calls.append((mu1, sigma1, mu2, sigma2))
        return float(np.abs(mu1 - mu2).sum() + np.abs(sigma1 - sigma2).sum())


@pytest.mark.filterwarnings("ignore:USING RANDOM INCEPTION WEIGHTS")
@pytest.mark.filterwarnings("ignore:reference .* is 32x32 but samples")
def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    spy = FrechetSpy()
    monkeypatch.setattr(ev, "frechet_distance", spy)
    # Runs 2 and 3 reuse run 1's image sets: compute each set's Inception features once.
    real_extract, cache = ev.extract_features, {}

    def extract_once(reader, model, batch_size=100, verbose=True):
        key = hashlib.sha1(b"".join(b.tobytes() for b in reader.batches(64))).hexdigest()
        if key not in cache:
            cache[key] = real_extract(reader, model, batch_size, verbose)
        return cache[key]

    monkeypatch.setattr(ev, "extract_features", extract_once)
    rng = np.random.default_rng(14)
    ref_images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    sample_images = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    ref, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
    np.savez(ref, ref_images)
    np.savez_compressed(sample, sample_images)

    # 1) ADM's positional form, JSON + sample statistics written.
    out, stats = tmp_path / "out" / "metrics.json", tmp_path / "sample_stats.npz"
    result = _run([str(ref), str(sample), "--save-path", str(out), "--save-stats", str(stats), "--batch-size", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split(":")[0] for l in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    saved = json.loads(out.read_text())
    assert saved["fid"] == result["fid"] and float(lines[1].split()[-1]) == result["fid"]
    assert saved["ref_batch"]["file"] == "ref.npz" and saved["ref_batch"]["num_images"] == 4
    assert saved["sample_batch"]["size_bytes"] == os.path.getsize(sample)
    assert saved["inception_weights"] == "random" and "meaningless" in saved["warning"]
    assert 1.0 <= saved["inception_score"] <= 4.0 and 0 <= saved["precision"] <= 1 and 0 <= saved["recall"] <= 1
    (mu1, sigma1, mu2, sigma2), (mu1s, _, _, _) = spy.calls
    assert mu1.shape == (2048,) and sigma1.shape == (2048, 2048) and mu1s.shape == (2023,)
    with np.load(stats) as z:
        np.testing.assert_array_equal(z["mu"], mu1)  # sample first, as in ADM's main()
        np.testing.assert_array_equal(z["sigma"], sigma1)
        assert z["pool_3"].shape == (4, 2048) and json.loads(str(z["meta"]))["random_inception_weights"]

    # 2) Flag form, with the sample's stats file (no images) as the reference: identical features.
    spy.calls.clear()
    again = _run(["--ref_batch", str(stats), "--sample_batch", str(sample)])
    capsys.readouterr()
    assert again["precision"] == again["recall"] == 1.0
    assert again["inception_score"] == pytest.approx(result["inception_score"], rel=1e-6)
    assert again["fid"] == pytest.approx(0.0, abs=1e-6) and again["sfid"] == pytest.approx(0.0, abs=1e-6)

    # 3) ADM's reference format: images + stored mu/sigma/mu_s/sigma_s; the stored ones win.
    spy.calls.clear()
    with np.load(stats) as z:
        np.savez(tmp_path / "ref_with_stats.npz", ref_images, **{k: z[k] for k in ev.STAT_KEYS})
    third = _run([str(tmp_path / "ref_with_stats.npz"), str(sample)])
    capsys.readouterr()
    assert third["fid"] == pytest.approx(0.0, abs=1e-6)  # the ref images differ, their stats are not used
    assert (third["precision"], third["recall"]) == (result["precision"], result["recall"])  # P/R use images
    assert third["ref_batch"]["stored_statistics"]

    # 4) Statistics of one batch only (e.g. a reference batch, computed once).
    only = tmp_path / "only_stats.npz"
    assert _run([str(sample), "--save-stats", str(only)]) == {"saved_stats": str(only)}
    assert capsys.readouterr().out == ""  # no metrics printed
    with np.load(only) as a, np.load(stats) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in ("mu", "sigma", "mu_s", "sigma_s", "pool_3"):
            np.testing.assert_array_equal(a[key], b[key])

    # 5) REG's eval.sh flags: the text file named from the run's values, five lines, and the JSON beside it.
    save_path = tmp_path / "exp" / "checkpoints"
    fifth = _run(["--ref_batch", str(ref), "--sample_batch", str(sample), "--save_path", str(save_path),
                  "--cfg_cond", "1", "--step", "4000000", "--num_steps", "250", "--cfg", "2.3", "--cls_cfg", "2.3",
                  "--gh", "0.85"])
    printed = capsys.readouterr().out
    assert save_path.is_dir()  # REG's evaluator creates it
    text = tmp_path / "exp" / "checkpoints25040000002.30.852.3cfg_cond_true.txt"
    lines = [f"Inception Score: {fifth['inception_score']}", f"FID: {fifth['fid']}", f"sFID: {fifth['sfid']}",
             f"Precision: {fifth['precision']}", f"Recall: {fifth['recall']}"]
    assert text.read_text() == "\n".join(lines) + "\n" == printed
    beside = json.loads(text.with_suffix(".json").read_text())
    assert beside["fid"] == fifth["fid"] == result["fid"]
    assert beside["run"] == {"cfg_cond": 1, "step": 4000000, "num_steps": 250, "cfg": 2.3, "cls_cfg": 2.3, "gh": 0.85}
    assert not list(tmp_path.glob("exp/.*.tmp"))
    assert len(cache) == 2  # the ref images and the sample images, each computed once


def test_stats_from_random_weights_refused_with_real_weights(tmp_path, model, monkeypatch):
    stats = tmp_path / "random_stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023),
             pool_3=np.zeros((4, 2048), np.float32),
             meta=np.array(json.dumps({"random_inception_weights": True})))
    monkeypatch.setattr(model, "random_weights", False)
    with pytest.raises(ev.EvalInputError, match="random Inception weights, but this run uses real"):
        ev.load_batch(ev.inspect_batch(str(stats)), model)


def test_stats_from_other_real_weights_refused(tmp_path, model, monkeypatch):
    stats = tmp_path / "other_stats.npz"
    _stats_file(stats, 24, model)
    monkeypatch.setattr(model, "weights_id", "sha256:" + "1" * 64)
    with pytest.raises(ev.EvalInputError, match=r"other_stats.npz: its stored features come from other Inception"):
        ev.load_batch(ev.inspect_batch(str(stats)), model)
    monkeypatch.setattr(model, "weights_id", "random")
    assert ev.load_batch(ev.inspect_batch(str(stats)), model, need_logits=False).pool.shape == (8, 2048)


@pytest.mark.parametrize("n_sample,n_ref", [(12, 40), (40, 300)])
def test_frechet_distance_from_features_equals_the_covariance_path(n_sample, n_ref):
    """A batch of fewer images than dimensions: the N x N path (from the features behind mu/sigma) gives the
    covariance path's value, whether the other side is singular too or not."""
    from evaluations.evaluator import compute_statistics, frechet_distance
    rng = np.random.default_rng(0)
    d = 256
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    sample = (rng.normal(size=(n_sample, d)) @ mix + 0.3).astype(np.float32)
    ref = (rng.normal(size=(n_ref, d)) @ mix).astype(np.float32)
    (mu1, s1), (mu2, s2) = compute_statistics(sample), compute_statistics(ref)
    slow = frechet_distance(mu1, s1, mu2, s2, device="cpu")
    fast = frechet_distance(mu1, s1, mu2, s2, device="cpu", features1=sample)
    assert abs(fast - slow) <= 1e-6 * abs(slow) and slow > 1
