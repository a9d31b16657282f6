"""Tests for evaluations/metrics.py: the statistics, Fréchet distance, Inception Score and
precision/recall against plain NumPy (and scipy) versions of ADM's formulas, and their bad-input errors.

CPU only, small dimensions (the full 2048-d comparison with scipy's sqrtm is opt-in).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.linalg
import torch

from evaluations import metrics
from evaluations.common import EvalInputError

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
    return metrics.compute_statistics(x)


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
    return metrics.compute_statistics(x + shift)


def test_frechet_distance_matches_numpy():
    rng = np.random.default_rng(0)
    mu1, s1 = random_stats(rng, 400, 48)
    mu2, s2 = random_stats(rng, 300, 48, shift=0.5)
    ours, ref = metrics.frechet_distance(mu1, s1, mu2, s2), np_fid(mu1, s1, mu2, s2)
    assert ref > 1.0
    assert abs(ours - ref) <= 1e-6 * ref


# full rank (Cholesky of S1); S1 singular (S2's factor); both singular (eigh)
@pytest.mark.parametrize("n1, n2", [(600, 500), (150, 600), (150, 200)])
def test_frechet_distance_equals_adm_sqrtm(n1, n2):
    rng = np.random.default_rng(n1)
    (mu1, s1), (mu2, s2) = feature_stats(rng, n1, 256), feature_stats(rng, n2, 256, shift=0.02)
    ref = adm_fid(mu1, s1, mu2, s2)
    assert ref > 1.0
    assert abs(metrics.frechet_distance(mu1, s1, mu2, s2, device="cpu") - ref) <= 1e-6 * ref
    assert abs(metrics.frechet_distance(mu2, s2, mu1, s1, device="cpu") - ref) <= 1e-6 * ref


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
    ours = metrics.frechet_distance(mu1, s1, mu2, s2, device="cpu")
    t2 = time.perf_counter()
    print(f"\n2048-d, n={n1},{n2}: sqrtm {t1 - t0:.1f} s, ours {t2 - t1:.1f} s, rel diff {abs(ours - ref) / ref:.2e}")
    assert abs(ours - ref) <= 1e-6 * ref


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    mu, s = random_stats(rng, 500, 64)
    assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-6 * np.trace(s)


@pytest.mark.parametrize("n2", [200, 12])  # S2 full rank: its factor is used; S2 singular too: eigh of S1
def test_frechet_distance_singular_covariances(n2):
    """Fewer samples than dimensions: S1 is singular and its Cholesky factorisation fails."""
    rng = np.random.default_rng(2)
    mu1, s1 = random_stats(rng, 10, 32)
    mu2, s2 = random_stats(rng, n2, 32, shift=0.3)
    assert torch.linalg.cholesky_ex(torch.from_numpy(s1))[1].item() != 0
    assert (torch.linalg.cholesky_ex(torch.from_numpy(s2))[1].item() != 0) == (n2 < 32)
    ref = adm_fid(mu1, s1, mu2, s2)
    assert abs(metrics.frechet_distance(mu1, s1, mu2, s2, device="cpu") - ref) <= 1e-6 * ref


def test_frechet_distance_eps_fallback(monkeypatch):
    """Non-finite trace -> retry with 1e-6 on both diagonals (and only then), as ADM does."""
    rng = np.random.default_rng(2)
    mu1, s1 = random_stats(rng, 200, 16)
    mu2, s2 = random_stats(rng, 200, 16, shift=1.0)
    real, calls = metrics._trace_sqrt_product, []

    def nan_then_real(a, b, device, factor1=None):
        calls.append((a, b))
        return (float("nan"), 0.0) if len(calls) == 1 else real(a, b, device)

    monkeypatch.setattr(metrics, "_trace_sqrt_product", nan_then_real)
    with pytest.warns(UserWarning, match="adding 1e-06"):
        value = metrics.frechet_distance(mu1, s1, mu2, s2)
    off = np.eye(16) * 1e-6
    np.testing.assert_allclose(calls[1][0], s1 + off)
    np.testing.assert_allclose(calls[1][1], s2 + off)
    assert abs(value - adm_fid(mu1, s1 + off, mu2, s2 + off)) < 1e-6 * value


def test_frechet_distance_rejects_non_psd_covariance():
    rng = np.random.default_rng(3)
    mu, s = random_stats(rng, 100, 8)
    bad = s - 2 * np.max(np.linalg.eigvalsh(s)) * np.outer(np.eye(8)[0], np.eye(8)[0])
    with pytest.raises(EvalInputError, match="not positive semidefinite"):
        metrics.frechet_distance(mu, bad, mu, s, device="cpu")
    with pytest.raises(EvalInputError, match="not positive semidefinite"):
        metrics.frechet_distance(mu, s, mu, bad, device="cpu")


def test_frechet_distance_rejects_nan_statistics():
    rng = np.random.default_rng(4)
    mu, s = random_stats(rng, 100, 8)
    bad = s.copy()
    bad[2, 3] = np.nan
    with pytest.raises(EvalInputError, match="sigma2 contains NaN"):
        metrics.frechet_distance(mu, s, mu, bad)


@pytest.mark.parametrize("n_sample,n_ref", [(12, 40), (40, 300)])
def test_frechet_distance_from_features_equals_the_covariance_path(n_sample, n_ref):
    """A batch of fewer images than dimensions: the N x N path (from the features behind mu/sigma) gives the
    covariance path's value, whether the other side is singular too or not."""
    rng = np.random.default_rng(0)
    d = 256
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    sample = (rng.normal(size=(n_sample, d)) @ mix + 0.3).astype(np.float32)
    ref = (rng.normal(size=(n_ref, d)) @ mix).astype(np.float32)
    (mu1, s1), (mu2, s2) = metrics.compute_statistics(sample), metrics.compute_statistics(ref)
    slow = metrics.frechet_distance(mu1, s1, mu2, s2, device="cpu")
    fast = metrics.frechet_distance(mu1, s1, mu2, s2, device="cpu", features1=sample)
    assert abs(fast - slow) <= 1e-6 * abs(slow) and slow > 1


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------

def test_inception_score_matches_numpy_with_contiguous_splits():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((70, 1008)) * 3).astype(np.float32)
    for split in (5000, 30, 7):  # one split; a partial last split; many splits
        ours, ref = metrics.inception_score(logits, split), np_inception_score(logits, split)
        assert abs(ours - ref) <= 1e-6 * ref
    # Splits are contiguous blocks in file order: permuting the rows changes a split score.
    perm = rng.permutation(70)
    assert abs(metrics.inception_score(logits[perm], 30) - metrics.inception_score(logits, 30)) > 1e-4
    # Under one split the order does not matter.
    assert abs(metrics.inception_score(logits[perm]) - metrics.inception_score(logits)) < 1e-5


def test_inception_score_zero_probabilities_are_finite():
    """Float32 softmax underflows to exactly 0 here; ADM's 0*log(0) would be NaN, ours is the limit."""
    logits = np.zeros((4, 1008), np.float32)
    logits[np.arange(4), np.arange(4)] = 200.0  # one-hot in float32
    assert abs(metrics.inception_score(logits) - 4.0) < 1e-4  # 4 distinct confident classes -> IS = 4


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
    assert metrics.precision_recall(ref, sample, device="cpu") == pytest.approx(expected, abs=1e-6)
    # Blocking (ADM: 10000 x 10000) must not change anything.
    assert metrics.precision_recall(ref, sample, block_size=50, device="cpu") == pytest.approx(expected, abs=1e-6)


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
        got = metrics.precision_recall(ref, sample, k=k, block_size=block, device="cpu")
        assert got == pytest.approx((precision, recall), abs=1e-12)
    # k is a parameter (k=1: the 2nd smallest distance, self included).
    expected_k1 = np_precision_recall(ref, sample, k=1)
    assert metrics.precision_recall(ref, sample, k=1, device="cpu") == pytest.approx(expected_k1, abs=1e-12)


def test_precision_recall_fp32_fallback_on_fp16_overflow():
    """|x|^2 > 65504 overflows fp16: ADM recomputes the block in fp32."""
    rng = np.random.default_rng(8)
    ref = (rng.integers(-3, 4, (25, 16)) * 300).astype(np.float32)
    sample = (rng.integers(-3, 4, (20, 16)) * 300).astype(np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite((ref.astype(np.float16) ** 2).sum(1)).all()
    d = metrics.squared_distances(torch.from_numpy(ref), torch.from_numpy(sample)).numpy()
    assert np.isfinite(d).all()
    np.testing.assert_array_equal(d, np_distances(ref, sample))
    assert metrics.precision_recall(ref, sample, device="cpu") == pytest.approx(np_precision_recall(ref, sample))


def test_precision_recall_needs_k_plus_one_points():
    rng = np.random.default_rng(9)
    with pytest.raises(EvalInputError, match="at least 4"):
        metrics.precision_recall(rng.standard_normal((10, 8)), rng.standard_normal((3, 8)), k=3, device="cpu")
