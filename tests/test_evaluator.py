"""Tests for evaluations/features.py and the command line of evaluations/evaluator.py: the in-memory
API (FeatureAccumulator, batch_from_features, load_reference), the CLI on tiny npz files with random
Inception weights (ADM's and REG's argument forms, outputs), and every bad-input error. The metrics,
the network and the npz reader have their own tests (test_metrics.py, test_inception.py, test_npz.py).

CPU only. Image counts stay tiny: every image goes through a 299x299 Inception-v3 forward.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from evaluations import evaluator as ev
from evaluations import features
from evaluations.common import STAT_KEYS, EvalInputError
from evaluations.metrics import compute_statistics
from evaluations.npz import NpzImageReader, inspect_batch, read_stored_meta
from reg.utils import file_sha256


# ----------------------------------------------------------------------------------------------
# In-memory API: FeatureAccumulator, batch_from_features, load_reference
# ----------------------------------------------------------------------------------------------

def test_feature_accumulator_equals_npz_path(random_inception, tmp_path):
    """Images handed over in odd pieces and layouts give the npz path's features, bit for bit, in order."""
    images = np.random.default_rng(20).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "three.npz", images)
    expected = features.extract_features(NpzImageReader(str(tmp_path / "three.npz")), random_inception, batch_size=2,
                                         verbose=False)
    acc = features.FeatureAccumulator(random_inception, batch_size=2)
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
    mu, sigma = compute_statistics(expected["pool"])
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
def test_feature_accumulator_refuses_wrong_images(random_inception, images, pattern):
    with pytest.raises(EvalInputError, match=pattern):
        features.FeatureAccumulator(random_inception).add(images)


def test_feature_accumulator_refuses_mixed_resolutions_and_empty(random_inception):
    acc = features.FeatureAccumulator(random_inception, batch_size=4)
    acc.add(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(EvalInputError, match="16x16 after 8x8"):
        acc.add(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(EvalInputError, match="no images"):
        features.FeatureAccumulator(random_inception).features()


def test_inception_forwards_run_with_tf32_off_and_restore_it(random_inception, monkeypatch):
    """ADM's graph runs in true fp32: every Inception forward (full batches in add(), the partial last one
    in features()) runs with TF32 off for matmuls and convolutions; the caller's setting comes back."""
    from reg.utils import fp32_precision, get_fp32_precision  # the shim: torch < 2.9 has no fp32_precision API
    seen = []

    def spy(x):
        seen.append((len(x), *get_fp32_precision()))
        return torch.zeros(len(x), 2048), torch.zeros(len(x), 2023), torch.zeros(len(x), 1008)

    monkeypatch.setattr(random_inception, "forward", spy)  # settings only: no 299x299 forward needed
    with fp32_precision("tf32"):
        acc = features.FeatureAccumulator(random_inception, batch_size=2)
        acc.add(np.zeros((3, 8, 8, 3), np.uint8))
        assert get_fp32_precision() == ("tf32", "tf32")
        acc.features()
        assert seen == [(2, "ieee", "ieee"), (1, "ieee", "ieee")]
        assert get_fp32_precision() == ("tf32", "tf32")


def test_batch_from_features_matches_statistics_and_checks_shapes():
    rng = np.random.default_rng(21)
    pool = rng.standard_normal((6, 2048)).astype(np.float32)
    spatial = rng.standard_normal((6, 2023)).astype(np.float32)
    logits = rng.standard_normal((6, 1008)).astype(np.float32)
    b = features.batch_from_features(torch.from_numpy(pool), spatial, logits, name="gathered")
    np.testing.assert_array_equal(b.mu_s, compute_statistics(spatial)[0])
    np.testing.assert_array_equal(b.sigma, compute_statistics(pool)[1])
    np.testing.assert_array_equal(b.logits, logits)
    with pytest.raises(EvalInputError, match="different numbers of images"):
        features.batch_from_features(pool, spatial[:5], logits)
    with pytest.raises(EvalInputError, match=r"'spatial' features have shape \(6, 2048\)"):
        features.batch_from_features(pool, pool, logits)


def _stats_file(path, seed, model):
    """A --save-stats file (no images), so load_reference runs no Inception forward."""
    feats = np.random.default_rng(seed).standard_normal((8, 2048)).astype(np.float32)
    batch = features.batch_from_features(feats, feats[:, :2023], None, name=str(path))
    features.save_statistics(str(path), batch, model)
    return batch


def test_load_reference_cache(random_inception, tmp_path):
    ref_path, cache = tmp_path / "ref.npz", tmp_path / "cache" / "ref_stats.npz"
    batch = _stats_file(ref_path, 22, random_inception)
    first = features.load_reference(str(ref_path), random_inception, cache_path=str(cache), verbose=False)
    assert cache.is_file() and not list(cache.parent.glob(".*.tmp"))
    meta = read_stored_meta(str(cache))
    assert meta["source"] == "ref.npz" and meta["source_size"] == os.path.getsize(ref_path)
    assert meta["inception_weights_id"] == random_inception.weights_id == "random"
    cached = features.load_reference(str(ref_path), random_inception, cache_path=str(cache), verbose=False)
    assert cached.info.path == str(cache)  # read from the cache, not recomputed
    for a in (first, cached):
        np.testing.assert_array_equal(a.mu, batch.mu)
        np.testing.assert_array_equal(a.pool, batch.pool)

    # The same content touched (a copy without -p): still this reference.
    os.utime(ref_path, ns=(1, 1))
    assert features.load_reference(str(ref_path), random_inception, cache_path=str(cache), verbose=False).info.path \
        == str(cache)
    # Another reference of the same name, size and modification time: refused by its content, cache kept.
    _stats_file(tmp_path / "other" / "ref.npz", 99, random_inception)  # written as the first: the same size
    os.replace(tmp_path / "other" / "ref.npz", ref_path)
    size = os.path.getsize(ref_path)
    os.utime(ref_path, ns=(1, 1))
    assert (meta["source_size"], os.stat(ref_path).st_mtime_ns) == (size, 1)
    with pytest.raises(EvalInputError, match="ref_stats.npz was not made from .*ref.npz.*source_sha256"):
        features.load_reference(str(ref_path), random_inception, cache_path=str(cache), verbose=False)
    assert read_stored_meta(str(cache))["source_sha256"] == meta["source_sha256"]  # not overwritten


def _strip_hash(cache):
    """The cache as an older version wrote it: no source_sha256 in its meta."""
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    del meta["source_sha256"]
    arrays["meta"] = np.array(json.dumps(meta))
    with open(cache, "wb") as f:
        np.savez(f, **arrays)


def test_an_older_reference_cache_is_checked_by_its_statistics(random_inception, tmp_path):
    """A cache without the content hash matched by name, size and mtime alone: recomputed and compared. The
    same content is kept (the hash added); other content of the same name, size and mtime is refused."""
    ref_path, cache = tmp_path / "ref.npz", tmp_path / "ref_stats.npz"
    _stats_file(ref_path, 24, random_inception)
    features.load_reference(str(ref_path), random_inception, cache_path=str(cache), verbose=False)
    _strip_hash(cache)
    features.load_reference(str(ref_path), random_inception, cache_path=str(cache), verbose=False)
    assert read_stored_meta(str(cache))["source_sha256"] == file_sha256(ref_path)  # upgraded
    _strip_hash(cache)
    stamp = os.stat(ref_path).st_mtime_ns
    _stats_file(tmp_path / "other" / "ref.npz", 25, random_inception)  # other statistics, written as the first
    os.replace(tmp_path / "other" / "ref.npz", ref_path)
    assert os.path.getsize(ref_path) == read_stored_meta(str(cache))["source_size"]
    os.utime(ref_path, ns=(stamp, stamp))
    with pytest.raises(EvalInputError, match="made from other content than .*ref.npz .same name, size and mod"):
        features.load_reference(str(ref_path), random_inception, cache_path=str(cache), verbose=False)
    assert "source_sha256" not in read_stored_meta(str(cache))  # left as it was


def test_load_reference_cache_refuses_other_weights(random_inception, tmp_path, monkeypatch):
    ref_path, cache = tmp_path / "ref.npz", tmp_path / "ref_stats.npz"
    _stats_file(ref_path, 23, random_inception)
    features.load_reference(str(ref_path), random_inception, cache_path=str(cache), verbose=False)
    monkeypatch.setattr(random_inception, "weights_id", "sha256:" + "0" * 64)
    with pytest.raises(EvalInputError, match="inception_weights_id: cache 'random' vs now 'sha256:0000"):
        features.load_reference(str(ref_path), random_inception, cache_path=str(cache), verbose=False)


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
    with pytest.raises(EvalInputError, match=pattern) as info:
        _run([good_npz, str(bad)])
    assert "bad.npz" in str(info.value)


def test_missing_arr_0(tmp_path, good_npz):
    bad = tmp_path / "nokey.npz"
    np.savez(bad, images=np.zeros((5, 8, 8, 3), np.uint8))
    with pytest.raises(EvalInputError, match=r"no 'arr_0' array .*found \['images'\]"):
        _run([str(bad), good_npz])


def test_too_few_images_for_precision_recall(tmp_path, good_npz):
    small = tmp_path / "three.npz"
    np.savez(small, np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(EvalInputError, match="three.npz: 3 images, but precision/recall with k=3 needs at least 4"):
        _run([good_npz, str(small)])


def test_nan_stored_statistics(tmp_path, good_npz):
    bad = tmp_path / "nanstats.npz"
    sigma = np.eye(2048)
    sigma[0, 0] = np.nan
    np.savez(bad, np.zeros((5, 8, 8, 3), np.uint8), mu=np.zeros(2048), sigma=sigma,
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with pytest.raises(EvalInputError, match="nanstats.npz: stored 'sigma' contains NaN"):
        _run([str(bad), good_npz])


def test_incomplete_stored_statistics(tmp_path, good_npz):
    bad = tmp_path / "partial.npz"
    np.savez(bad, np.zeros((5, 8, 8, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(EvalInputError, match=r"not \['mu_s', 'sigma_s'\]"):
        _run([str(bad), good_npz])


def test_cli_argument_forms(good_npz):
    a = ev.parse_args(["R.npz", "S.npz", "--save-path", "o.json"])
    b = ev.parse_args(["--ref_batch", "R.npz", "--sample_batch", "S.npz", "--save_path", "o.json"])
    assert (a.ref_batch, a.sample_batch, a.save_path) == (b.ref_batch, b.sample_batch, b.save_path) \
        == ("R.npz", "S.npz", "o.json")
    assert ev.parse_args(["R.npz", "--save-stats", "r.npz"]).sample_batch is None
    with pytest.raises(SystemExit):
        ev.parse_args(["R.npz"])  # one batch only makes sense with --save-stats


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
    with pytest.raises(EvalInputError, match="--save_path: .*taken.json is a directory"):
        _run([good_npz, good_npz, "--save_path", str(tmp_path / "taken.json")])
    # REG's form: the text file's name is save_path + the run's values; a folder there is refused too.
    (tmp_path / "exp25000.10.90.1cfg_cond_true.txt").mkdir()
    with pytest.raises(EvalInputError, match="cfg_cond_true.txt is a directory"):
        _run([good_npz, good_npz, "--save_path", str(tmp_path / "exp"), "--cfg", "0.1", "--gh", "0.9",
              "--cls_cfg", "0.1", "--step", "0"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(EvalInputError, match="cannot create the folder .* is a file"):
        _run([good_npz, good_npz, "--save-stats", str(tmp_path / "file" / "stats.npz")])
    with pytest.raises(EvalInputError, match="is the input batch"):
        _run([good_npz, good_npz, "--save-stats", good_npz])
    with pytest.raises(_NoInception):  # good paths get through to the network
        _run([good_npz, good_npz, "--save_path", str(tmp_path / "ok.json")])


def test_resolution_mismatch_warns(tmp_path, good_npz, no_inception):
    big = tmp_path / "big.npz"
    np.savez(big, np.zeros((5, 16, 16, 3), np.uint8))
    with pytest.warns(UserWarning, match=r"good.npz is 8x8 but samples .*big.npz are 16x16"), \
            pytest.raises(_NoInception):
        _run([good_npz, str(big)])


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
    monkeypatch.setattr(features, "frechet_distance", spy)
    # Runs 2 and 3 reuse run 1's image sets: compute each set's Inception features once.
    real_extract, cache = features.extract_features, {}

    def extract_once(reader, model, batch_size=100, verbose=True):
        key = hashlib.sha1(b"".join(b.tobytes() for b in reader.batches(64))).hexdigest()
        if key not in cache:
            cache[key] = real_extract(reader, model, batch_size, verbose)
        return cache[key]

    monkeypatch.setattr(features, "extract_features", extract_once)
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
        np.savez(tmp_path / "ref_with_stats.npz", ref_images, **{k: z[k] for k in STAT_KEYS})
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


def test_stats_from_random_weights_refused_with_real_weights(tmp_path, random_inception, monkeypatch):
    stats = tmp_path / "random_stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023),
             pool_3=np.zeros((4, 2048), np.float32),
             meta=np.array(json.dumps({"random_inception_weights": True})))
    monkeypatch.setattr(random_inception, "random_weights", False)
    with pytest.raises(EvalInputError, match="random Inception weights, but this run uses real"):
        features.load_batch(inspect_batch(str(stats)), random_inception)


def test_stats_from_other_real_weights_refused(tmp_path, random_inception, monkeypatch):
    stats = tmp_path / "other_stats.npz"
    _stats_file(stats, 24, random_inception)
    monkeypatch.setattr(random_inception, "weights_id", "sha256:" + "1" * 64)
    with pytest.raises(EvalInputError, match=r"other_stats.npz: its stored features come from other Inception"):
        features.load_batch(inspect_batch(str(stats)), random_inception)
    monkeypatch.setattr(random_inception, "weights_id", "random")
    assert features.load_batch(inspect_batch(str(stats)), random_inception, need_logits=False).pool.shape == (8, 2048)
