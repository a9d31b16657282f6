"""ADM-exact FID / sFID / Inception Score / Precision / Recall, in PyTorch (no TensorFlow).

Every number in this field is reported with OpenAI's ADM evaluator (guided-diffusion/evaluations,
TensorFlow 1 graph of Inception-v3 2015-12-05). This module reproduces it (docs/design.md#evaluation):

- Network: torch-fidelity's `FeatureExtractorInceptionV3`, an exact port of that graph (TF1 bilinear
  resize to 299, (x - 128) / 128, same weights `weights-inception-2015-12-05-6726825d.pth`).
- FID on pool_3 (2048-d); sFID on `mixed_6/conv` = `Mixed_6d.branch1x1` after BN+ReLU, first 7
  channels, flattened channels-last (17*17*7 = 2023-d); IS on softmax(pool_3 @ W), W the 2048x1008
  logits weight without bias; precision/recall with ADM's k-NN manifolds (k=3).

Usage (ADM's positional form; REG's evaluator flags work unchanged):

    python -m evaluations.evaluator VIRTUAL_imagenet256_labeled.npz samples.npz --save-path out.json
    python evaluations/evaluator.py --ref_batch REF.npz --sample_batch SAMPLE.npz --save_path DIR \
        --cfg_cond 1 --step 4000000 --num_steps 250 --cfg 2.3 --cls_cfg 2.3 --gh 0.85
    python -m evaluations.evaluator REF.npz --save-stats ref_stats.npz   # features of one batch, once

In memory (in-training FID, guidance sweeps; images go from the decoder straight into Inception):

    model = build_inception(resolve_weights(None), "cuda")
    ref = load_reference("VIRTUAL_imagenet256_labeled.npz", model, cache_path="ref_stats.npz")
    acc = FeatureAccumulator(model)
    acc.add(uint8_images)            # any number of times; (N, 3, H, W) or (N, H, W, 3)
    metrics = compute_metrics(ref, acc.finish())

The metric functions (`frechet_distance`, `inception_score`, `precision_recall`) are importable and
work on plain NumPy arrays.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import queue
import struct
import sys
import threading
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch_fidelity.feature_extractor_inceptionv3 as tfi
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script (`python evaluations/evaluator.py`, as REG's eval.sh does)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import atomic_json_dump, atomic_write, atomic_write_bytes, fp32_precision  # noqa: E402

INCEPTION_URL = tfi.URL_INCEPTION_V3
INCEPTION_FILENAME = INCEPTION_URL.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
WEIGHTS_ENV = "REG_INCEPTION_WEIGHTS"

POOL_DIM = 2048      # pool_3
SPATIAL_DIM = 2023   # mixed_6/conv[..., :7], 17 * 17 * 7
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
STAT_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM),
               "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
FEATURES_KEY = "pool_3"  # per-image pool_3 features, written by --save-stats (precision/recall need them)


class EvalInputError(ValueError):
    """An input file that would give wrong numbers: the message names the file and the problem."""


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights are missing or unreadable; the message says what to fetch and where."""


def _log(msg: str, verbose: bool = True) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Metrics (docs/design.md#evaluation). Plain NumPy in, Python floats out.
# ----------------------------------------------------------------------------------------------

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
    device = torch.device(device) if device is not None else _default_device()

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


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    device = torch.device(device) if device is not None else _default_device()

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


# ----------------------------------------------------------------------------------------------
# Reading npz files without loading them whole.
# ----------------------------------------------------------------------------------------------

def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: no such file")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise EvalInputError(f"{path}: not an .npz file (expected np.savez output with arr_0)") from None


def npz_keys(path: str) -> list[str]:
    with _open_zip(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def check_images(shape: tuple, dtype: np.dtype, path: str) -> None:
    """ADM's format: arr_0 uint8 NHWC, 3 channels. Anything else would silently give wrong numbers."""
    if dtype != np.uint8:
        hint = (" Float images must be converted first, e.g. ((x + 1) * 127.5).round().clip(0, 255)"
                ".astype(np.uint8) for [-1, 1] data." if np.issubdtype(dtype, np.floating) else "")
        raise EvalInputError(f"{path}: arr_0 has dtype {dtype}, expected uint8 images in [0, 255].{hint}")
    if len(shape) != 4:
        raise EvalInputError(f"{path}: arr_0 has shape {shape}, expected (N, H, W, 3) uint8")
    if shape[-1] != 3:
        if shape[1] == 3:
            raise EvalInputError(f"{path}: arr_0 has shape {shape}, which looks channels-first (N, 3, H, W); "
                                 "expected channels-last (N, H, W, 3): save x.transpose(0, 2, 3, 1)")
        raise EvalInputError(f"{path}: arr_0 has shape {shape}, expected 3 RGB channels last (N, H, W, 3)")
    if shape[0] == 0:
        raise EvalInputError(f"{path}: arr_0 holds no images")


def _read_exact(f, size: int, path: str) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = f.read(size - len(buf))
        if not chunk:
            raise EvalInputError(f"{path}: arr_0 is truncated (wanted {size} more bytes)")
        buf += chunk
    return bytes(buf)


class NpzImageReader:
    """Batches of `arr_0` from an .npz, never the whole array in RAM.

    np.savez stores members uncompressed: the array is then memory-mapped at the member's offset in
    the zip. A compressed npz (np.savez_compressed) is decompressed sequentially, one batch at a time.
    """

    def __init__(self, path: str, key: str = "arr_0"):
        self.path, self.member = path, f"{key}.npy"
        with _open_zip(path) as zf:
            if self.member not in zf.namelist():
                keys = [n[:-4] for n in zf.namelist()]
                raise EvalInputError(f"{path}: no '{key}' array in this npz (found {keys}); expected the "
                                     f"images as {key}, uint8 (N, H, W, 3), as written by np.savez(path, images)")
            info = zf.getinfo(self.member)
            try:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise EvalInputError(f"{path}: unsupported .npy format version {version} for {key}")
                    self._header_len = f.tell()
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a small member is read whole: CRC checked
                raise EvalInputError(f"{path}: member {self.member} is corrupt ({type(e).__name__}: {e})") from e
        check_images(shape, dtype, path)
        self.shape, self.dtype = tuple(shape), dtype

        nbytes = int(np.prod(shape)) * dtype.itemsize
        if info.file_size < self._header_len + nbytes:
            raise EvalInputError(f"{path}: {key} is truncated ({info.file_size} bytes for shape {shape})")
        self._memmap = self._raw = None
        self._crc, self._member_size, self._fortran = info.CRC, info.file_size, fortran
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            start = self._member_data_offset(path, info)
            self._memmap = np.memmap(path, dtype=dtype, mode="r", offset=start + self._header_len,
                                     shape=self.shape, order="F" if fortran else "C")
            # The member's bytes as stored, for its CRC-32 (the memmap bypasses zipfile's check).
            self._raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(info.file_size,))
        elif fortran:
            raise EvalInputError(f"{path}: {key} is Fortran-ordered inside a compressed npz and cannot be "
                                 "streamed; re-save it with np.savez(path, np.ascontiguousarray(x))")

    @staticmethod
    def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
        # The local header's extra field (zip64 sizes, written by np.savez) may differ from the central
        # directory's, so read its lengths from the local header itself.
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise EvalInputError(f"{path}: corrupt zip local header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len

    @property
    def memory_mapped(self) -> bool:
        return self._memmap is not None

    def __len__(self) -> int:
        return self.shape[0]

    def _check_crc(self, crc: int) -> None:
        if crc & 0xFFFFFFFF != self._crc:
            raise EvalInputError(f"{self.path}: member {self.member} fails its CRC-32 check (stored {self._crc:08x}, "
                                 f"read {crc & 0xFFFFFFFF:08x}): the file is corrupt; re-create or re-download it")

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield (B, H, W, 3) uint8 arrays in file order (views into the memmap, or fresh buffers).
        The member's CRC-32 is checked on the way; a mismatch raises after the last batch."""
        n = len(self)
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        if self._memmap is not None:
            crc, pos = zlib.crc32(self._raw[:self._header_len]), self._header_len
            for i in range(0, n, batch_size):
                if not self._fortran:  # C order: this batch is the next stretch of the file
                    end = self._header_len + min(i + batch_size, n) * row_bytes
                    crc, pos = zlib.crc32(self._raw[pos:end], crc), end
                yield self._memmap[i:i + batch_size]
            for start in range(pos, self._member_size, 1 << 26):  # the rest (all of it when Fortran-ordered)
                crc = zlib.crc32(self._raw[start:min(start + (1 << 26), self._member_size)], crc)
            self._check_crc(crc)
            return
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                crc = zlib.crc32(_read_exact(f, self._header_len, self.path))
                for i in range(0, n, batch_size):
                    b = min(batch_size, n - i)
                    data = _read_exact(f, b * row_bytes, self.path)
                    crc = zlib.crc32(data, crc)
                    yield np.frombuffer(data, dtype=self.dtype).reshape(b, *self.shape[1:])
                crc = zlib.crc32(f.read(), crc)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # zipfile's own CRC check, bad deflate data
            raise EvalInputError(f"{self.path}: member {self.member} is corrupt ({type(e).__name__}: {e})") from e
        self._check_crc(crc)


@contextlib.contextmanager
def _open_npz(path: str) -> Iterator[np.lib.npyio.NpzFile]:
    """np.load, with a corrupt member (CRC mismatch, bad deflate data) reported as an EvalInputError
    naming the file (zipfile's message names the member)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            yield npz
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise EvalInputError(f"{path}: corrupt npz member ({type(e).__name__}: {e}); re-create or re-download "
                             "the file") from e


def read_stored_statistics(path: str) -> Optional[dict[str, np.ndarray]]:
    """`mu, sigma, mu_s, sigma_s` stored in the npz (ADM's reference batches carry them), or None."""
    with _open_npz(path) as npz:
        present = [k for k in STAT_KEYS if k in npz.files]
        if not present:
            return None
        if len(present) != len(STAT_KEYS):
            missing = [k for k in STAT_KEYS if k not in present]
            raise EvalInputError(f"{path}: has stored statistics {present} but not {missing}; "
                                 f"ADM's format needs all of {list(STAT_KEYS)}")
        stats = {k: npz[k] for k in STAT_KEYS}
    for k, a in stats.items():
        if a.shape != STAT_SHAPES[k]:
            raise EvalInputError(f"{path}: stored '{k}' has shape {a.shape}, expected {STAT_SHAPES[k]}")
        if not np.isfinite(a).all():
            raise EvalInputError(f"{path}: stored '{k}' contains NaN/inf; these statistics are broken, "
                                 "delete them from the npz (or recompute with --save-stats)")
    return stats


def read_stored_meta(path: str) -> Optional[dict]:
    """JSON metadata that --save-stats writes next to the statistics (never pickle)."""
    with _open_npz(path) as npz:
        if "meta" not in npz.files:
            return None
        return json.loads(str(npz["meta"]))


# ----------------------------------------------------------------------------------------------
# Inception-v3 (torch-fidelity's TF-exact port) with the sFID hook.
# ----------------------------------------------------------------------------------------------

def ieee_fp32() -> contextlib.AbstractContextManager:
    """TF32 off for matmuls and convolutions inside the block: ADM's graph runs in true fp32.
    Kept for callers of the old name; it is utils.fp32_precision("ieee")."""
    return fp32_precision("ieee")


class _InceptionLayers(nn.Module):
    """The parameterised layers of torch-fidelity 0.4.0's FeatureExtractorInceptionV3, same names and
    order: only used to make a seeded random state dict. A drift from torch-fidelity's own list
    fails its strict load_state_dict, loudly."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = tfi.BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = tfi.BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = tfi.BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = tfi.BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = tfi.BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = tfi.InceptionA(192, pool_features=32)
        self.Mixed_5c = tfi.InceptionA(256, pool_features=64)
        self.Mixed_5d = tfi.InceptionA(288, pool_features=64)
        self.Mixed_6a = tfi.InceptionB(288)
        self.Mixed_6b = tfi.InceptionC(768, channels_7x7=128)
        self.Mixed_6c = tfi.InceptionC(768, channels_7x7=160)
        self.Mixed_6d = tfi.InceptionC(768, channels_7x7=160)
        self.Mixed_6e = tfi.InceptionC(768, channels_7x7=192)
        self.Mixed_7a = tfi.InceptionD(768)
        self.Mixed_7b = tfi.InceptionE_1(1280)
        self.Mixed_7c = tfi.InceptionE_2(2048)
        self.fc = nn.Linear(2048, 1008)


def _random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded so that two runs (e.g. --save-stats, then evaluation) see the same random network;
    fan-in normal init keeps activations O(1) through the 90+ conv layers."""
    net = _InceptionLayers()
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5, generator=g)
            nn.init.normal_(m.bias, generator=g)  # non-zero, so biased and unbiased logits differ
    return net.state_dict()


def _torch_fidelity_inception(state: dict[str, torch.Tensor]) -> tfi.FeatureExtractorInceptionV3:
    """torch-fidelity's network built through its own constructor argument
    `feature_extractor_weights_path`, which it reads with torch.load(weights_only=False). We never
    hand it a user's file: it gets an in-memory copy of a state dict that we loaded with
    weights_only=True (plain tensors, so unpickling it runs no code)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return tfi.FeatureExtractorInceptionV3("inception-v3-adm", ["2048", "logits_unbiased"],
                                           feature_extractor_weights_path=buf)


def default_weights_path() -> str:
    """Where torch-fidelity's own download lands: <torch hub dir>/checkpoints/<file name>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILENAME)


def _weights_help(path: str) -> str:
    return (f"Fetch {INCEPTION_FILENAME} from\n  {INCEPTION_URL}\non a machine with internet access and "
            f"either put it at\n  {path}\n(torch-fidelity's torch-hub checkpoints dir; set TORCH_HOME to "
            f"move it) or pass --inception-weights /path/to/{INCEPTION_FILENAME} (or set {WEIGHTS_ENV}).")


def resolve_weights(spec: Optional[str]) -> Optional[str]:
    """--inception-weights beats $REG_INCEPTION_WEIGHTS beats torch-fidelity's default location."""
    if spec:
        return spec
    return os.environ.get(WEIGHTS_ENV) or None


def _load_error_text(e: BaseException) -> str:
    """torch.load's message, minus its advice to retry with weights_only=False (we never do)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    return text[text.index(marker):].strip() if marker in text else text


def _load_state_dict(spec: Optional[str], verbose: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, identity): the identity is "random" or the sha256 of the weights file, so cached
    statistics can tell which network made them whatever the file is called."""
    if spec == "random":
        return _random_state_dict(), "random"
    if spec is not None:
        path = os.path.expanduser(spec)
        if not os.path.isfile(path):
            raise InceptionWeightsError(f"Inception weights file {path} does not exist.\n"
                                        + _weights_help(default_weights_path()))
    else:
        path = default_weights_path()
        if not os.path.isfile(path):
            _log(f"downloading {INCEPTION_URL} to {path}", verbose)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, path, progress=verbose)
            except Exception as e:  # URLError, HTTPError, timeouts, SSL, disk: all mean "not there"
                raise InceptionWeightsError(
                    f"Inception weights are not at {path} and downloading them failed "
                    f"({type(e).__name__}: {e}).\n" + _weights_help(path)) from e
    try:
        with open(path, "rb") as f:
            data = f.read()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionWeightsError(f"cannot read Inception weights {path} ({type(e).__name__}: "
                                    f"{_load_error_text(e)}).\n" + _weights_help(default_weights_path())) from e
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{path} holds a {type(state).__name__}, not an Inception-v3 state dict.\n"
                                    + _weights_help(default_weights_path()))
    return state, "sha256:" + hashlib.sha256(data).hexdigest()


class InceptionV3(nn.Module):
    """pool_3 (2048), spatial (2023, channels-last) and logits (1008, no bias) for uint8 NCHW images."""

    def __init__(self, net: tfi.FeatureExtractorInceptionV3, random_weights: bool, weights: str,
                 weights_id: str = "unknown"):
        super().__init__()
        self.net, self.random_weights, self.weights = net, random_weights, weights
        self.weights_id = weights_id  # "random" or "sha256:<hex>" of the weights file
        self._spatial: Optional[torch.Tensor] = None
        # mixed_6/conv:0 in the TF graph is the ReLU output of Mixed_6d's 1x1 branch.
        net.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    def _grab_spatial(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._spatial = output

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pool, logits = self.net(images)
        spatial, self._spatial = self._spatial, None
        if spatial is None or tuple(spatial.shape[1:]) != (192, 17, 17):
            raise RuntimeError(f"Mixed_6d.branch1x1 hook gave {None if spatial is None else spatial.shape}, "
                               "expected (N, 192, 17, 17)")
        # TF tensors are NHWC: ADM's spatial[..., :7] then reshape(N, -1) flattens (h, w, c).
        spatial = spatial[:, :7].permute(0, 2, 3, 1).reshape(len(spatial), SPATIAL_DIM)
        return pool, spatial.float(), logits

    @torch.no_grad()
    def logits_from_pool(self, pool: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """pool_3 @ W (no bias), the same product as torch-fidelity's 'logits_unbiased' output."""
        w = self.net.fc.weight
        with fp32_precision("ieee"):
            out = [(torch.as_tensor(pool[i:i + batch_size], device=w.device) @ w.T).cpu().numpy()
                   for i in range(0, len(pool), batch_size)]
        return np.concatenate(out).astype(np.float32)


def build_inception(weights: Optional[str] = None, device: torch.device | str = "cpu",
                    verbose: bool = True) -> InceptionV3:
    """Inception-v3 2015-12-05. `weights`: None (torch-fidelity's default file, downloaded if
    missing), a local .pth path, or "random" (smoke tests only: the numbers mean nothing)."""
    state, weights_id = _load_state_dict(weights, verbose)
    random_weights = weights_id == "random"
    if random_weights:
        banner = "!" * 78
        msg = ("USING RANDOM INCEPTION WEIGHTS: FID/sFID/IS/precision/recall below are MEANINGLESS "
               "(smoke test only)")
        _log(f"{banner}\n{msg}\n{banner}")
        warnings.warn(msg)
    try:
        net = _torch_fidelity_inception(state)
    except RuntimeError as e:  # wrong keys/shapes: not the Inception-2015 weights
        detail = str(e) if len(str(e)) < 300 else str(e)[:300] + " ..."  # the key lists run long
        raise InceptionWeightsError(f"{weights or default_weights_path()} does not hold the expected Inception-v3 "
                                    f"weights ({detail}).\n" + _weights_help(default_weights_path())) from e
    label = "random" if random_weights else (weights or default_weights_path())
    return InceptionV3(net, random_weights=random_weights, weights=label, weights_id=weights_id).to(device).eval()


def _prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Read/decompress the next batches on a thread while the network runs."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def worker():
        try:
            for item in it:
                q.put(item)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _as_nchw_uint8(images, device: torch.device) -> torch.Tensor:
    """uint8 images as an (N, 3, H, W) tensor on `device`: torch (N, H, W, 3) or (N, 3, H, W), or
    NumPy (N, H, W, 3) (ADM's npz layout). Anything else would give wrong features: refused."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise EvalInputError(f"FeatureAccumulator.add: NumPy images have dtype {images.dtype}, expected uint8 "
                                 "in [0, 255] (e.g. ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8))")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise EvalInputError(f"FeatureAccumulator.add: NumPy images have shape {images.shape}, expected "
                                 "(N, H, W, 3) uint8 (channels last, as in ADM's npz files)")
        if not images.flags.writeable:  # e.g. a memmap view; torch.from_numpy wants a writable buffer
            images = images.copy()
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
        return x.permute(0, 3, 1, 2).contiguous()
    if not isinstance(images, torch.Tensor):
        raise EvalInputError(f"FeatureAccumulator.add: expected a uint8 torch.Tensor or NumPy array, "
                             f"got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise EvalInputError(f"FeatureAccumulator.add: images have dtype {images.dtype}, expected torch.uint8 in "
                             "[0, 255] (e.g. ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))")
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise EvalInputError(f"FeatureAccumulator.add: images have shape {tuple(images.shape)}, expected "
                             "(N, H, W, 3) or (N, 3, H, W)")
    if images.shape[1] == 3 and images.shape[-1] == 3:
        raise EvalInputError(f"FeatureAccumulator.add: shape {tuple(images.shape)} is ambiguous (3 pixels wide "
                             "and 3 channels); pass NumPy (N, H, W, 3) instead")
    x = images.to(device, non_blocking=True)
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    return x.contiguous()


class FeatureAccumulator:
    """Inception features of images handed over in any number of pieces, straight from a decoder (no
    PNG, no npz). Images are regrouped into forwards of exactly `batch_size`, in add() order, so the
    features equal, bit for bit, those that the npz path (`extract_features`, same batch size) gives
    for the same images.

        acc = FeatureAccumulator(model)
        for latents in ...: acc.add(decode(latents))     # uint8 (N, 3, H, W) on the GPU
        metrics = compute_metrics(load_reference(REF, model), acc.finish())
    """

    def __init__(self, model: InceptionV3, batch_size: int = 100):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size
        self.device = next(model.parameters()).device
        self.image_shape: Optional[tuple] = None  # (H, W, 3), as BatchInfo records it
        self._pending: list[torch.Tensor] = []
        self._pending_count = 0
        self._out: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}

    def __len__(self) -> int:
        return sum(len(p) for p in self._out["pool"]) + self._pending_count

    def add(self, images) -> None:
        """uint8 images: torch (N, H, W, 3) or (N, 3, H, W), or NumPy (N, H, W, 3); any device."""
        x = _as_nchw_uint8(images, self.device)
        shape = (x.shape[2], x.shape[3], 3)
        if self.image_shape is None:
            self.image_shape = shape
        elif shape != self.image_shape:  # one batch is one resolution, as in an npz
            raise EvalInputError(f"FeatureAccumulator.add: images of {shape[0]}x{shape[1]} after "
                                 f"{self.image_shape[0]}x{self.image_shape[1]} ones; one accumulator per resolution")
        if len(x) == 0:
            return
        self._pending.append(x)
        self._pending_count += len(x)
        if self._pending_count >= self.batch_size:
            x = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
            full = len(x) - len(x) % self.batch_size
            for i in range(0, full, self.batch_size):
                self._forward(x[i:i + self.batch_size])
            rest = x[full:]
            self._pending, self._pending_count = ([rest] if len(rest) else []), len(rest)

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> None:
        with fp32_precision("ieee"):
            for name, feat in zip(("pool", "spatial", "logits"), self.model(x)):
                self._out[name].append(feat.cpu().numpy())

    def _flush(self) -> None:
        if self._pending:
            self._forward(torch.cat(self._pending))
            self._pending, self._pending_count = [], 0

    def features(self) -> dict[str, np.ndarray]:
        """{"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)} float32, in add() order.
        Runs the last, partial batch; images added afterwards start a new batch."""
        self._flush()
        if not self._out["pool"]:
            raise EvalInputError("FeatureAccumulator: no images were added")
        feats = {k: np.concatenate(v).astype(np.float32, copy=False) for k, v in self._out.items()}
        self._out = {k: [v] for k, v in feats.items()}  # keep one array, not one per batch
        if not all(np.isfinite(f).all() for f in feats.values()):
            raise EvalInputError("FeatureAccumulator: Inception produced non-finite features")
        return feats

    def finish(self, name: str = "samples") -> "BatchFeatures":
        """Features and ADM statistics of everything added, ready for compute_metrics()."""
        f = self.features()
        return batch_from_features(f["pool"], f["spatial"], f["logits"], name=name, image_shape=self.image_shape)


@torch.no_grad()
def extract_features(reader: NpzImageReader, model: InceptionV3, batch_size: int = 100,
                     verbose: bool = True) -> dict[str, np.ndarray]:
    """pool_3 / spatial / logits for every image of `reader`, in file order, float32."""
    acc = FeatureAccumulator(model, batch_size)
    batches = _prefetch(np.array(b) for b in reader.batches(batch_size))  # copy: memmap is read-only
    for batch in tqdm(batches, total=-(-len(reader) // batch_size), desc=os.path.basename(reader.path),
                      file=sys.stderr, disable=not verbose, unit="batch"):
        acc.add(batch)
    try:
        return acc.features()
    except EvalInputError as e:
        raise EvalInputError(f"{reader.path}: {e}") from e


# ----------------------------------------------------------------------------------------------
# One batch (images or stored features), and the full evaluation.
# ----------------------------------------------------------------------------------------------

@dataclass
class BatchInfo:
    """What an input npz holds, checked before any expensive work."""
    path: str
    keys: list[str]
    num_images: int
    image_shape: Optional[tuple]  # (H, W, 3), None for a features-only stats file
    stored_stats: bool


def inspect_batch(path: str) -> BatchInfo:
    keys = npz_keys(path)
    stored = read_stored_statistics(path) is not None  # also validates shapes / NaN
    if "arr_0" in keys:
        reader = NpzImageReader(path)  # validates dtype / layout
        return BatchInfo(path, keys, len(reader), reader.shape[1:], stored)
    if FEATURES_KEY in keys:
        with _open_npz(path) as npz:
            shape = npz[FEATURES_KEY].shape
        if len(shape) != 2 or shape[1] != POOL_DIM:
            raise EvalInputError(f"{path}: '{FEATURES_KEY}' has shape {shape}, expected (N, {POOL_DIM})")
        if not stored:
            raise EvalInputError(f"{path}: has '{FEATURES_KEY}' but no stored {list(STAT_KEYS)}; "
                                 "sFID needs either the images (arr_0) or the statistics")
        return BatchInfo(path, keys, shape[0], None, stored)
    raise EvalInputError(f"{path}: no 'arr_0' array in this npz (found {keys}); expected the images as "
                         "arr_0, uint8 (N, H, W, 3), as written by np.savez(path, images) "
                         f"(or a stats file from --save-stats, holding '{FEATURES_KEY}' and {list(STAT_KEYS)})")


@dataclass
class BatchFeatures:
    info: BatchInfo
    pool: np.ndarray              # (N, 2048) pool_3, for precision/recall
    logits: Optional[np.ndarray]  # (N, 1008), for the Inception Score
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    # Per-image features behind mu/sigma and mu_s/sigma_s, kept for batches of fewer images than dimensions
    # (fast Fréchet path); None when the statistics were stored or the batch is large.
    pool_factor: Optional[np.ndarray] = None
    spatial_factor: Optional[np.ndarray] = None


def load_batch(info: BatchInfo, model: InceptionV3, batch_size: int = 100, need_logits: bool = True,
               verbose: bool = True) -> BatchFeatures:
    """Features of one input, and its statistics: stored ones when present (as ADM does)."""
    meta = read_stored_meta(info.path)
    if meta is not None and meta.get("random_inception_weights", False) != model.random_weights:
        raise EvalInputError(f"{info.path}: its stored features were computed with "
                             f"{'random' if meta.get('random_inception_weights') else 'real'} Inception weights, "
                             f"but this run uses {'random' if model.random_weights else 'real'} ones")
    stored_id = (meta or {}).get("inception_weights_id")
    if stored_id is not None and model.weights_id != "unknown" and stored_id != model.weights_id:
        raise EvalInputError(f"{info.path}: its stored features come from other Inception weights ({stored_id}) "
                             f"than this run's {model.weights} ({model.weights_id}); features of two networks "
                             "cannot be compared")
    stored = read_stored_statistics(info.path)
    if info.image_shape is not None:
        _log(f"computing activations of {info.path} ({info.num_images} images)", verbose)
        feats = extract_features(NpzImageReader(info.path), model, batch_size, verbose)
        pool, logits = feats["pool"], feats["logits"]
        spatial = feats["spatial"]
    else:
        with _open_npz(info.path) as npz:
            pool = npz[FEATURES_KEY].astype(np.float32)
        spatial = None
        logits = model.logits_from_pool(pool) if need_logits else None
    if stored is not None:
        _log(f"using the statistics stored in {info.path}", verbose)
        return BatchFeatures(info, pool, logits, **stored)
    mu, sigma = compute_statistics(pool)
    mu_s, sigma_s = compute_statistics(spatial)
    small = len(pool) <= SPATIAL_DIM
    return BatchFeatures(info, pool, logits, mu, sigma, mu_s, sigma_s,
                         pool if small else None, spatial if small else None)


def compute_metrics(ref: BatchFeatures, sample: BatchFeatures, k: int = 3,
                    device: Optional[torch.device | str] = None) -> dict[str, float]:
    """ADM's five numbers; Fréchet distances are taken sample-first, as ADM's main() does."""
    precision, recall = precision_recall(ref.pool, sample.pool, k=k, device=device)
    return {
        "inception_score": inception_score(sample.logits),
        "fid": frechet_distance(sample.mu, sample.sigma, ref.mu, ref.sigma, device=device,
                                features1=sample.pool_factor),
        "sfid": frechet_distance(sample.mu_s, sample.sigma_s, ref.mu_s, ref.sigma_s, device=device,
                                 features1=sample.spatial_factor),
        "precision": precision,
        "recall": recall,
    }


def batch_from_features(pool, spatial, logits, name: str = "samples",
                        image_shape: Optional[tuple] = None) -> BatchFeatures:
    """A BatchFeatures (with ADM's statistics) from per-image features, e.g. FeatureAccumulator.features()
    of every rank gathered in rank order. Arrays: pool (N, 2048), spatial (N, 2023), logits (N, 1008)
    or None; NumPy or torch, any device."""
    arrays = {}
    for key, value, dim in (("pool", pool, POOL_DIM), ("spatial", spatial, SPATIAL_DIM), ("logits", logits, None)):
        if value is None and key == "logits":
            arrays[key] = None
            continue
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        value = np.asarray(value, dtype=np.float32)
        if value.ndim != 2 or (dim is not None and value.shape[1] != dim):
            raise EvalInputError(f"{name}: '{key}' features have shape {value.shape}, expected (N, {dim or 1008})")
        if not np.isfinite(value).all():
            raise EvalInputError(f"{name}: '{key}' features contain NaN/inf")
        arrays[key] = value
    counts = {k: len(v) for k, v in arrays.items() if v is not None}
    if len(set(counts.values())) != 1:
        raise EvalInputError(f"{name}: feature arrays hold different numbers of images {counts}")
    n = counts["pool"]
    if n < 2:
        raise EvalInputError(f"{name}: {n} image(s); statistics need at least 2")
    info = BatchInfo(name, [], n, tuple(image_shape) if image_shape is not None else None, False)
    mu, sigma = compute_statistics(arrays["pool"])
    mu_s, sigma_s = compute_statistics(arrays["spatial"])
    small = n <= SPATIAL_DIM
    return BatchFeatures(info, arrays["pool"], arrays["logits"], mu, sigma, mu_s, sigma_s,
                         arrays["pool"] if small else None, arrays["spatial"] if small else None)


def _source_record(path: str) -> dict:
    """What identifies an input file cheaply: its name, size and modification time."""
    st = os.stat(path)
    return {"source": os.path.basename(path), "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def save_statistics(path: str, batch: BatchFeatures, model: InceptionV3) -> None:
    """mu/sigma/mu_s/sigma_s (ADM's keys) + per-image pool_3 features for precision/recall, so the
    file can stand in for its batch later (e.g. a reference batch, computed once). Written atomically."""
    meta = {"source": os.path.basename(batch.info.path), "num_images": batch.info.num_images,
            "inception_weights": model.weights, "inception_weights_id": model.weights_id,
            "random_inception_weights": model.random_weights}
    if os.path.isfile(batch.info.path):
        meta.update(_source_record(batch.info.path))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, mu=batch.mu, sigma=batch.sigma, mu_s=batch.mu_s, sigma_s=batch.sigma_s,
                     **{FEATURES_KEY: batch.pool.astype(np.float32)}, meta=np.array(json.dumps(meta)))
    atomic_write(path, write)


def load_reference(path: str, model: InceptionV3, *, cache_path: Optional[str] = None, batch_size: int = 100,
                   verbose: bool = True) -> BatchFeatures:
    """The reference side of compute_metrics(): an ADM reference npz (its stored statistics are used, as
    ADM does) or a --save-stats file.

    With `cache_path`, the reference's features are computed once: an existing cache is read if it was
    made from this very file (name, size, modification time) with the same Inception weights (their
    sha256, or "random"); a missing one is computed and written atomically. A cache made from another
    file or other weights is refused, never overwritten (it may belong to another run)."""
    if cache_path is None or not os.path.exists(cache_path):
        info = inspect_batch(path)
        ref = load_batch(info, model, batch_size, need_logits=False, verbose=verbose)
        if cache_path is not None:
            save_statistics(cache_path, ref, model)
            _log(f"cached the reference statistics of {path} in {cache_path}", verbose)
        return ref
    want = {**_source_record(path), "inception_weights_id": model.weights_id}
    try:
        meta = read_stored_meta(cache_path) or {}
    except Exception as e:
        raise EvalInputError(f"reference cache {cache_path} (for {path}) is unreadable "
                             f"({type(e).__name__}: {e}); delete it to recompute") from e
    got = {k: meta.get(k) for k in want}
    if got != want:
        diff = ", ".join(f"{k}: cache {got[k]!r} vs now {want[k]!r}" for k in want if got[k] != want[k])
        raise EvalInputError(f"reference cache {cache_path} was not made from {path} with these Inception "
                             f"weights ({diff}); pass another cache path, or delete the cache to recompute")
    _log(f"reading the cached reference statistics {cache_path}", verbose)
    return load_batch(inspect_batch(cache_path), model, batch_size, need_logits=False, verbose=verbose)


def _describe(info: BatchInfo) -> dict:
    return {"file": os.path.basename(info.path), "path": os.path.abspath(info.path),
            "size_bytes": os.path.getsize(info.path), "num_images": info.num_images,
            "image_shape": list(info.image_shape) if info.image_shape else None,
            "stored_statistics": info.stored_stats}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m evaluations.evaluator",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="ADM-exact FID / sFID / IS / precision / recall without TensorFlow "
                    "(docs/design.md#evaluation). Accepts REG's evaluations/evaluator.py flags unchanged.")
    g = p.add_argument_group("inputs")
    g.add_argument("batches", nargs="*", metavar="NPZ",
                   help="REF.npz SAMPLE.npz (ADM's order), or one NPZ together with --save-stats")
    g.add_argument("--ref_batch", "--ref-batch", default=None, help="reference batch (flag form of REF.npz)")
    g.add_argument("--sample_batch", "--sample-batch", default=None, help="sample batch (flag form of SAMPLE.npz)")
    g = p.add_argument_group("outputs")
    g.add_argument("--save_path", "--save-path", default=None,
                   help="PATH ending in .json: write the metrics there as JSON. Any other PATH, as in REG's "
                        "evaluator: create the folder PATH if missing, write the five metric lines to PATH + "
                        "num_steps + step + cfg + gh + cls_cfg + 'cfg_cond_true.txt' (or 'cfg_cond_false.txt'), "
                        "concatenated without a separator, and the JSON beside it (same name, .json)")
    g.add_argument("--save-stats", "--save_stats", default=None,
                   help="write mu/sigma/mu_s/sigma_s + pool_3 features of the sample batch (or of the only "
                        "batch given) to this .npz; pass it later instead of the images")
    g = p.add_argument_group("run description (REG's evaluator flags: they only name the text file, "
                             "and are recorded in the JSON)")
    g.add_argument("--cfg_cond", default=1, type=int, help="1: name ends in cfg_cond_true.txt, 0: cfg_cond_false.txt")
    g.add_argument("--step", default=1, type=int, help="training step of the checkpoint")
    g.add_argument("--num_steps", default=250, type=int, help="sampling steps")
    g.add_argument("--cfg", default=1.0, type=float, help="classifier-free guidance scale")
    g.add_argument("--cls_cfg", default=1.0, type=float, help="class-token guidance scale")
    g.add_argument("--gh", default=1.0, type=float, help="guidance high (guidance while t <= gh)")
    g = p.add_argument_group("Inception network")
    g.add_argument("--inception-weights", default=None,
                   help=f"local {INCEPTION_FILENAME}, or 'random' (smoke tests only); if unset: "
                        f"${WEIGHTS_ENV}, else torch-fidelity's download into the torch hub checkpoints dir")
    g.add_argument("--batch-size", type=int, default=100, help="images per Inception forward")
    g.add_argument("--device", default=None, help="cuda / cpu; if unset: cuda when available")
    g.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = p.parse_args(argv)

    positional = list(args.batches)
    if args.ref_batch is None and positional:
        args.ref_batch = positional.pop(0)
    if args.sample_batch is None and positional:
        args.sample_batch = positional.pop(0)
    if positional:
        p.error(f"too many input files: {args.batches} (give REF.npz SAMPLE.npz)")
    if args.ref_batch is None or (args.sample_batch is None and args.save_stats is None):
        p.error("need REF.npz and SAMPLE.npz (or one NPZ with --save-stats)")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def original_text_path(save_path: str, num_steps: int, step: int, cfg: float, gh: float, cls_cfg: float,
                       cfg_cond: int) -> str:
    """REG evaluations/evaluator.py main(): the result file's name is these values concatenated onto
    save_path without a separator (so it lands next to the folder save_path, not inside it)."""
    tail = "cfg_cond_true.txt" if cfg_cond else "cfg_cond_false.txt"
    return save_path + str(num_steps) + str(step) + str(cfg) + str(gh) + str(cls_cfg) + tail


@dataclass
class OutputPlan:
    json_path: Optional[str] = None
    text_path: Optional[str] = None
    stats_path: Optional[str] = None
    make_dir: Optional[str] = None  # REG's evaluator creates save_path as a folder


def _check_writable(path: str, flag: str, inputs: Sequence[str]) -> None:
    if os.path.isdir(path):
        raise EvalInputError(f"{flag}: {path} is a directory; the output file cannot be written there")
    for src in inputs:
        if src and os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src):
            raise EvalInputError(f"{flag}: {path} is the input batch {src}; refusing to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise EvalInputError(f"{flag}: cannot create the folder for {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvalInputError(f"{flag}: cannot write {path}: {existing} is not writable")


def plan_outputs(args: argparse.Namespace) -> OutputPlan:
    """Every output path, checked before any image is read (a bad one used to fail after the work)."""
    plan, inputs = OutputPlan(), [args.ref_batch, args.sample_batch]
    if args.save_path:
        if args.save_path.endswith(".json"):
            plan.json_path = args.save_path
        else:
            # REG's evaluator creates the folder save_path when missing (its text file lands beside it)
            plan.make_dir = None if os.path.exists(args.save_path) else args.save_path
            plan.text_path = original_text_path(args.save_path, args.num_steps, args.step, args.cfg, args.gh,
                                                args.cls_cfg, args.cfg_cond)
            plan.json_path = plan.text_path[:-len(".txt")] + ".json"
            if plan.make_dir:
                _check_writable(plan.make_dir, "--save_path", inputs)
            _check_writable(plan.text_path, "--save_path", inputs)
        _check_writable(plan.json_path, "--save_path", inputs)
    if args.save_stats:
        _check_writable(args.save_stats, "--save-stats", inputs)
        plan.stats_path = args.save_stats
    return plan


METRIC_LINES = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                ("Precision", "precision"), ("Recall", "recall"))


def original_text(metrics: dict) -> str:
    """The five lines REG's evaluator writes, in its format ("{}".format of each value)."""
    return "".join("{}: {}\n".format(label, metrics[key]) for label, key in METRIC_LINES)


def main(args: argparse.Namespace) -> dict:
    start = time.time()
    verbose = not args.quiet
    device = torch.device(args.device) if args.device else _default_device()
    k = 3

    # Check every input and output before the expensive part, so a bad path fails in seconds.
    infos = [inspect_batch(p) for p in (args.ref_batch, args.sample_batch) if p is not None]
    if len(infos) == 2:
        for info in infos:
            if info.num_images < k + 1:
                raise EvalInputError(f"{info.path}: {info.num_images} images, but precision/recall with k={k} "
                                     f"needs at least {k + 1} per batch (ADM uses 50000 samples, 10000 refs)")
        shapes = [info.image_shape for info in infos]
        if None not in shapes and shapes[0][:2] != shapes[1][:2]:
            msg = (f"reference {infos[0].path} is {shapes[0][0]}x{shapes[0][1]} but samples {infos[1].path} are "
                   f"{shapes[1][0]}x{shapes[1][1]}: Inception resizes both to 299, but such FIDs are not comparable "
                   "with published ones (use the reference batch of the samples' resolution)")
            _log(f"warning: {msg}", verbose)
            warnings.warn(msg)
    plan = plan_outputs(args)
    if plan.make_dir:
        os.makedirs(plan.make_dir, exist_ok=True)

    model = build_inception(resolve_weights(args.inception_weights), device, verbose)
    if len(infos) == 1:  # stats-only mode: one batch in, its statistics out
        batch = load_batch(infos[0], model, args.batch_size, need_logits=False, verbose=verbose)
        save_statistics(plan.stats_path, batch, model)
        _log(f"wrote statistics of {infos[0].path} to {plan.stats_path}", verbose)
        return {"saved_stats": plan.stats_path}

    ref = load_batch(infos[0], model, args.batch_size, need_logits=False, verbose=verbose)
    sample = load_batch(infos[1], model, args.batch_size, need_logits=True, verbose=verbose)
    if plan.stats_path:
        save_statistics(plan.stats_path, sample, model)
        _log(f"wrote statistics of {sample.info.path} to {plan.stats_path}", verbose)

    _log("computing evaluations...", verbose)
    metrics = compute_metrics(ref, sample, k=k, device=device)
    print(original_text(metrics), end="", flush=True)

    result = dict(metrics)
    result.update({"ref_batch": _describe(ref.info), "sample_batch": _describe(sample.info),
                   "inception_weights": model.weights, "inception_weights_id": model.weights_id, "k": k,
                   "device": str(device), "seconds": round(time.time() - start, 2),
                   "run": {key: getattr(args, key) for key in ("cfg_cond", "step", "num_steps", "cfg", "cls_cfg", "gh")}})
    if model.random_weights:
        result["warning"] = "random Inception weights: these numbers are meaningless"
    if plan.text_path:
        atomic_write_bytes(plan.text_path, original_text(metrics).encode())
        _log(f"wrote {plan.text_path}", verbose)
    if plan.json_path:
        atomic_json_dump(result, plan.json_path, sort_keys=False)
        _log(f"wrote {plan.json_path}", verbose)
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except (EvalInputError, InceptionWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
