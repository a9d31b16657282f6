"""Inception features and ADM statistics of one batch of images, and the five metrics of two batches:
the evaluator's in-memory API (docs/design.md#evaluation). Images come from an npz (`load_batch`) or
straight from a decoder (`FeatureAccumulator`: in-training FID, guidance sweeps; no PNG, no npz); a
reference batch's statistics can be cached once (`load_reference`, `save_statistics`)."""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from evaluations.common import FEATURES_KEY, POOL_DIM, SPATIAL_DIM, EvalInputError, log
from evaluations.inception import InceptionV3
from evaluations.metrics import compute_statistics, frechet_distance, inception_score, precision_recall
from evaluations.npz import BatchInfo, NpzImageReader, inspect_batch, open_npz, read_stored_meta, read_stored_statistics
from reg.utils import atomic_write, file_sha256, fp32_precision


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
        log(f"computing activations of {info.path} ({info.num_images} images)", verbose)
        feats = extract_features(NpzImageReader(info.path), model, batch_size, verbose)
        pool, logits = feats["pool"], feats["logits"]
        spatial = feats["spatial"]
    else:
        with open_npz(info.path) as npz:
            pool = npz[FEATURES_KEY].astype(np.float32)
        spatial = None
        logits = model.logits_from_pool(pool) if need_logits else None
    if stored is not None:
        log(f"using the statistics stored in {info.path}", verbose)
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


def save_statistics(path: str, batch: BatchFeatures, model: InceptionV3, *, source_sha256: str | None = None) -> None:
    """mu/sigma/mu_s/sigma_s (ADM's keys) + per-image pool_3 features for precision/recall, so the
    file can stand in for its batch later (e.g. a reference batch, computed once). Written atomically.
    `source_sha256`: the content hash of the batch's file, recorded for load_reference's check."""
    meta = {"source": os.path.basename(batch.info.path), "num_images": batch.info.num_images,
            "inception_weights": model.weights, "inception_weights_id": model.weights_id,
            "random_inception_weights": model.random_weights}
    if os.path.isfile(batch.info.path):
        meta.update(_source_record(batch.info.path))
    if source_sha256 is not None:
        meta["source_sha256"] = source_sha256

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, mu=batch.mu, sigma=batch.sigma, mu_s=batch.mu_s, sigma_s=batch.sigma_s,
                     **{FEATURES_KEY: batch.pool.astype(np.float32)}, meta=np.array(json.dumps(meta, allow_nan=False)))
    atomic_write(path, write)


def load_reference(path: str, model: InceptionV3, *, cache_path: Optional[str] = None, batch_size: int = 100,
                   verbose: bool = True, source_sha256: str | None = None) -> BatchFeatures:
    """The reference side of compute_metrics(): an ADM reference npz (its stored statistics are used, as
    ADM does) or a --save-stats file.

    With `cache_path`, the reference's features are computed once: an existing cache is read if it was
    made from a file of this content (its sha256; `source_sha256` if the caller has it) with the same
    Inception weights (their sha256, or "random"); a missing one is computed and written atomically. A cache
    made from other content or other weights is refused, never overwritten (it may belong to another run).
    A cache of an older version, which recorded only the file's name, size and modification time, is
    checked by computing the statistics again: kept (with the hash added) if they agree, else refused."""
    if cache_path is None:
        return load_batch(inspect_batch(path), model, batch_size, need_logits=False, verbose=verbose)
    sha = source_sha256 or file_sha256(path)
    if not os.path.exists(cache_path):
        ref = load_batch(inspect_batch(path), model, batch_size, need_logits=False, verbose=verbose)
        save_statistics(cache_path, ref, model, source_sha256=sha)
        log(f"cached the reference statistics of {path} in {cache_path}", verbose)
        return ref
    try:
        meta = read_stored_meta(cache_path) or {}
    except Exception as e:
        raise EvalInputError(f"reference cache {cache_path} (for {path}) is unreadable "
                             f"({type(e).__name__}: {e}); delete it to recompute") from e
    want = {"source_sha256": sha, "inception_weights_id": model.weights_id}
    if "source_sha256" not in meta:  # an older cache: its identity was the name, size and mtime
        want = {**_source_record(path), "inception_weights_id": model.weights_id}
    got = {k: meta.get(k) for k in want}
    if got != want:
        diff = ", ".join(f"{k}: cache {got[k]!r} vs now {want[k]!r}" for k in want if got[k] != want[k])
        raise EvalInputError(f"reference cache {cache_path} was not made from {path} with these Inception "
                             f"weights ({diff}); pass another cache path, or delete the cache to recompute")
    if "source_sha256" not in meta:
        return _check_older_cache(path, cache_path, model, batch_size, verbose, sha)
    log(f"reading the cached reference statistics {cache_path}", verbose)
    return load_batch(inspect_batch(cache_path), model, batch_size, need_logits=False, verbose=verbose)


def _check_older_cache(path: str, cache_path: str, model: InceptionV3, batch_size: int, verbose: bool,
                       sha: str) -> BatchFeatures:
    """A cache without the source's hash: the same name, size and mtime do not prove the same content (a copy
    with `cp -p`, a file rewritten in place), so the statistics are computed again and compared."""
    log(f"reference cache {cache_path} has no content hash (an older version's): checking it against {path}", verbose)
    ref = load_batch(inspect_batch(path), model, batch_size, need_logits=False, verbose=verbose)
    cached = load_batch(inspect_batch(cache_path), model, batch_size, need_logits=False, verbose=False)
    for key in ("mu", "sigma"):  # other content moves them by far more than a recomputation's rounding
        if not np.allclose(getattr(ref, key), getattr(cached, key), rtol=1e-3, atol=1e-5):
            raise EvalInputError(f"reference cache {cache_path} was made from other content than {path} (same name, "
                                 f"size and modification time, other statistics); delete the cache to recompute")
    save_statistics(cache_path, ref, model, source_sha256=sha)  # the same statistics, now with the hash
    return ref
