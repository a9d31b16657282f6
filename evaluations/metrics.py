"""ADM's metrics on Inception features (docs/design.md#evaluation): the statistics, the Fréchet
distance (FID on pool_3, sFID on the spatial features), the Inception Score and improved
precision/recall with ADM's k-NN manifolds. Plain NumPy in, Python floats out; the heavy linear
algebra runs in torch, on the GPU when there is one."""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from evaluations.common import EvalInputError, default_device
from reg.utils import fp32_precision


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ADM's statistics: mean (in the features' dtype, float32 for ours) and np.cov(rowvar=False)."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise EvalInputError(f"statistics need a (N>=2, D) feature array, got shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, device: torch.device,
                        factor1: Optional[np.ndarray] = None) -> tuple[float, float]:
    """(Tr sqrt(S1 S2), smallest eigenvalue / largest) in float64.

    For S1 = R R^T, S1 S2 has the eigenvalues of the symmetric PSD matrix R^T S2 R, so the trace of
    the square root is the sum of the square roots of its eigenvalues (eigvalsh; no sqrtm). R is
    S1's Cholesky factor; when S1 is singular (fewer images than dimensions) S2's (the roles swap:
    S2 S1 has the same eigenvalues); when both are, V diag(sqrt(w)) from eigh of S1, its
    roundoff-negative eigenvalues clipped to 0 (slower: a full eigendecomposition). `factor1`, any R with
    R R^T = S1 (the centred features / sqrt(N - 1), d x N), makes R^T S2 R an N x N matrix: the fast path
    for a batch of fewer images than dimensions, which needs no decomposition of S1 at all."""
    a = torch.as_tensor(sigma1, dtype=torch.float64, device=device)
    b = torch.as_tensor(sigma2, dtype=torch.float64, device=device)
    if factor1 is not None:
        r, info = torch.as_tensor(factor1, dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int32)
    else:
        r, info = torch.linalg.cholesky_ex(a)
    if info.item() != 0:  # S1 singular (few samples): S2 S1 has the same eigenvalues, try S2's factor
        r2, info2 = torch.linalg.cholesky_ex(b)
        if info2.item() == 0:
            a, b, r = b, a, r2
        else:
            w, v = torch.linalg.eigh(a)
            if w[0] < -1e-6 * w[-1].abs():
                raise EvalInputError(f"Fréchet distance: the first covariance is not positive semidefinite "
                                     f"(eigenvalue {w[0].item():.3g}, largest {w[-1].item():.3g}): broken statistics")
            r = v * w.clamp_min(0).sqrt()
    m = r.T @ b @ r
    lam = torch.linalg.eigvalsh((m + m.T) / 2)
    ratio = (lam[0] / lam[-1]).item() if lam[-1] > 0 else 0.0
    return lam.clamp_min(0).sqrt().sum().item(), ratio


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, device: Optional[torch.device | str] = None,
                     features1: Optional[np.ndarray] = None) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr sqrt(S1 S2), ADM's value
    (docs/design.md#evaluation).

    ADM takes Tr of scipy's sqrtm(S1 S2) (its real part); we take the same trace from the eigenvalues
    of a symmetric PSD matrix (`_trace_sqrt_product`), in float64, on the GPU when there is one: a few
    seconds instead of a minute at 2048-d on a CPU, equal to ADM's value to ~1e-8 relative (tested,
    near-singular covariances included). As in ADM, a non-finite result is retried with `eps` added
    to both diagonals. ADM's check of sqrtm's imaginary part becomes a check that S1 S2 has no
    clearly negative eigenvalue (it has none for covariance matrices). `features1`, the (N, d) features that
    mu1/sigma1 were computed from, is used when N <= d: the same trace from an N x N matrix (milliseconds).
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariance shapes {sigma1.shape}, {sigma2.shape} do not match mean {mu1.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise EvalInputError(f"{name} contains NaN/inf: the statistics are broken (too few images, "
                                 "or non-finite features); refusing to report a Fréchet distance")
    device = torch.device(device) if device is not None else default_device()

    diff = mu1 - mu2
    factor1 = None
    if features1 is not None and 2 <= len(features1) <= len(mu1):
        x = np.asarray(features1, dtype=np.float64)  # np.cov's arithmetic: float64, ddof 1
        factor1 = ((x - x.mean(axis=0)) / np.sqrt(len(x) - 1)).T  # (d, N): factor1 @ factor1.T == sigma1
    tr_covmean, ratio = _trace_sqrt_product(sigma1, sigma2, device, factor1)
    if not np.isfinite(tr_covmean):
        warnings.warn(f"Fréchet distance: singular product, adding {eps} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        tr_covmean, ratio = _trace_sqrt_product(sigma1 + offset, sigma2 + offset, device)
    if ratio < -1e-6:
        raise EvalInputError(f"Fréchet distance: S1 S2 has a negative eigenvalue ({ratio:.3g} of the largest); "
                             "the covariances are not positive semidefinite, the statistics are broken")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's Inception Score: float32 softmax of the 1008-way logits (pool_3 @ W, no bias), then
    exp(E[KL(p(y|x) || p(y))]) per contiguous block of `split_size` in file order, averaged.

    One deliberate difference: 0 * log 0 is taken as 0. ADM (and improved-gan) would return NaN for
    a probability that underflows to exactly 0 in float32; whenever ADM's result is finite, ours is
    identical.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or len(logits) == 0:
        raise EvalInputError(f"inception_score expects (N>0, classes) logits, got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise EvalInputError("inception_score: logits contain NaN/inf")
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    probs = e / e.sum(axis=1, keepdims=True)  # float32, like tf.nn.softmax in ADM's graph

    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), np.float32(0))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's DistanceBlock: pairwise squared L2 distances (rows of u vs rows of v) as float32.

    ADM evaluates max(|u|^2 - 2 u.v + |v|^2, 0) in fp16, op by op, and recomputes the block in fp32
    when any fp16 value is non-finite. We round to fp16 after every op the same way; the matmul and
    the norm reductions accumulate in fp32 and round once (as TF/cuBLAS do), so CPU and GPU round
    identically (up to fp32 summation order inside the matmul).
    """
    u16, v16 = u.half(), v.half()
    nu = (u16 * u16).float().sum(1).half()
    nv = (v16 * v16).float().sum(1).half()
    uv = (u16.float() @ v16.float().T).half()
    d = (nu[:, None] - 2 * uv + nv[None, :]).clamp_min(0)
    if torch.isfinite(d).all():
        return d.float()
    nu, nv = (u * u).sum(1), (v * v).sum(1)
    return (nu[:, None] - 2 * (u @ v.T) + nv[None, :]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = 3, block_size: int = 10000) -> torch.Tensor:
    """Radius of each point's k-NN ball: the (k+1)-th smallest squared distance in its row, self
    (distance ~0) included, i.e. ADM's `np.partition(row, k)[k]`. Rows and columns go in blocks;
    a running top-(k+1) replaces ADM's full (block, N) distance row, with the same result."""
    n = len(features)
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, block_size):
        rows = features[r0:r0 + block_size]
        best = None
        for c0 in range(0, n, block_size):
            d = squared_distances(rows, features[c0:c0 + block_size])
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values  # sorted ascending
        radii[r0:r0 + block_size] = best[:, k]
    return radii


@torch.no_grad()
def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                     block_size: int = 10000, device: Optional[torch.device | str] = None) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al.) with ADM's ManifoldEstimator semantics.

    precision = fraction of samples inside the reference manifold, recall = fraction of references
    inside the sample manifold; "inside" means d^2(x, c) <= radius(c) for some centre c (note `<=`).
    Distances go in blocks of `block_size` x `block_size`, on the GPU when there is one.
    """
    ref_features = np.asarray(ref_features, dtype=np.float32)
    sample_features = np.asarray(sample_features, dtype=np.float32)
    for name, f in (("ref_features", ref_features), ("sample_features", sample_features)):
        if f.ndim != 2:
            raise EvalInputError(f"precision_recall: {name} must be (N, D), got shape {tuple(f.shape)}")
        if len(f) < k + 1:
            raise EvalInputError(f"precision_recall with k={k} needs at least {k + 1} points per set "
                                 f"(the k-th neighbour besides the point itself); {name} has {len(f)}")
    if ref_features.shape[1] != sample_features.shape[1]:
        raise EvalInputError(f"feature dims differ: {ref_features.shape[1]} vs {sample_features.shape[1]}")
    device = torch.device(device) if device is not None else default_device()

    with fp32_precision("ieee"):
        ref = torch.as_tensor(ref_features, device=device)
        sam = torch.as_tensor(sample_features, device=device)
        ref_radii = manifold_radii(ref, k, block_size)
        sam_radii = manifold_radii(sam, k, block_size)
        ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
        sam_in = torch.zeros(len(sam), dtype=torch.bool, device=device)
        for r0 in range(0, len(ref), block_size):
            r1 = r0 + block_size
            for s0 in range(0, len(sam), block_size):
                s1 = s0 + block_size
                d = squared_distances(ref[r0:r1], sam[s0:s1])  # (refs, samples), as ADM orients it
                sam_in[s0:s1] |= (d <= ref_radii[r0:r1, None]).any(dim=0)
                ref_in[r0:r1] |= (d <= sam_radii[None, s0:s1]).any(dim=1)
    return sam_in.double().mean().item(), ref_in.double().mean().item()
