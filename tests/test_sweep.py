"""sweep.py: the same images for every setting, resume after a kill, refusal of a folder made with
other inputs. The Inception network and the metric are stand-ins (fast: conftest.py's sweep_setup); the
evaluator's own tests cover the real ones."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import sweep
from helpers import each_change_is_refused, run_sweep, run_two_processes


def test_same_seeds_across_settings_table_and_plot(sweep_setup):
    summary = run_sweep(sweep_setup)
    out = sweep_setup / "out"
    results = json.loads((out / "results.json").read_text())
    fid = {sweep.setting_key(r): r["metrics"]["fid"] for r in results["rows"]}
    assert len(fid) == 5  # cfg 1 once (unguided: the interval and class-token scale do not act)
    unguided = fid["sde-3-cfg-1.0-clscfg-0.0-gl-0.0-gh-1.0"]
    # guidance on no step = the unguided images, exactly: same labels and noise for every setting
    assert fid["sde-3-cfg-1.5-clscfg-1.5-gl-0.5-gh-0.51"] == unguided
    assert fid["sde-3-cfg-3.0-clscfg-1.5-gl-0.5-gh-0.51"] == unguided
    assert fid["sde-3-cfg-3.0-clscfg-1.5-gl-0.5-gh-1.0"] != unguided
    assert fid["sde-3-cfg-3.0-clscfg-1.5-gl-0.5-gh-1.0"] != fid["sde-3-cfg-1.5-clscfg-1.5-gl-0.5-gh-1.0"]
    assert summary["unguided"]["metrics"]["fid"] == unguided
    assert summary["best_guided"]["metrics"]["fid"] == min(v for k, v in fid.items() if "cfg-1.0" not in k)
    table = (out / "results.md").read_text()
    assert "| best with guidance |" in table and "| without guidance (cfg 1) |" in table
    assert (out / "fid.png").stat().st_size > 1000 and (out / "reference-stats.npz").exists()


def test_resume_skips_finished_settings_and_refuses_other_inputs(sweep_setup):
    run_sweep(sweep_setup, "--cfg-scale", "1,3")
    files = sorted((sweep_setup / "out" / "settings").glob("*.json"))
    assert len(files) == 3
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    lost = files[0]
    lost.unlink()  # a kill before this setting finished
    run_sweep(sweep_setup, "--cfg-scale", "1,3")
    assert lost.exists()
    for f in files[1:]:
        assert f.stat().st_mtime_ns == stamps[f.name]  # not recomputed
    # adding settings to the grid reuses the finished ones
    run_sweep(sweep_setup, "--cfg-scale", "1,3,1.5")
    assert len(list((sweep_setup / "out" / "settings").glob("*.json"))) == 5
    for flags, what in ((["--global-seed", "1"], "global_seed"), (["--num-samples", "4"], "num_samples"),
                        (["--balanced"], "balanced")):
        with pytest.raises(ValueError, match=f"other settings.*{what}"):
            run_sweep(sweep_setup, *flags)
    # another reference batch (a new file under the same name) or another checkpoint
    import os
    ref = sweep_setup / "ref.npz"
    os.utime(ref, ns=(ref.stat().st_atime_ns, ref.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="other settings.*reference"):
        run_sweep(sweep_setup)
    os.utime(ref, ns=(ref.stat().st_atime_ns, ref.stat().st_mtime_ns - 10**9))
    (sweep_setup / "copy.safetensors").write_bytes((sweep_setup / "ema.safetensors").read_bytes())
    (sweep_setup / "copy.json").write_bytes((sweep_setup / "ema.json").read_bytes())
    with pytest.raises(ValueError, match="other settings.*checkpoint"):
        run_sweep(sweep_setup, "--ckpt", str(sweep_setup / "copy.safetensors"))


def test_grid_parsing():
    args = sweep.parse_args(["--ref-batch", "r.npz", "--out", "o", "--cfg-scale", "1,2", "--guidance-low", "0.9",
                             "--guidance-high", "0.5,1"])
    with pytest.warns(UserWarning, match="guidance-low 0.9 > guidance-high 0.5"):
        requested, distinct = sweep.build_grid(args)
    assert len(requested) == 2 and len(distinct) == 2
    with pytest.raises(SystemExit):
        sweep.parse_args(["--ref-batch", "r", "--out", "o", "--cfg-scale", "1,x"])


def test_default_guidance_high_list_doubles_the_guided_settings():
    """What docs/sampling.md's sweep section says of the default grid: 2 x 2 guided settings and one unguided."""
    default = sweep.parse_args(["--ref-batch", "r.npz", "--out", "o"])
    one = sweep.parse_args(["--ref-batch", "r.npz", "--out", "o", "--guidance-high", "0.85"])
    assert [len(sweep.build_grid(a)[1]) for a in (default, one)] == [5, 3]
    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "sampling.md").read_text().split())
    shown = ",".join(f"{h:g}" for h in default.guidance_high)
    assert f"The default `--guidance-high {shown}` doubles every guided setting" in text and "5 in all" in text


def test_paper_column():
    paper = [{"method": "reg", "iterations": 400_000, "guidance": False, "cfg": 1.0, "fid": 15.4},
             {"method": "reg", "iterations": 4_000_000, "guidance": True, "cfg": 2.3, "fid": 1.36}]
    assert sweep._paper_cell(paper, True) == "1.36 (4000K it, cfg 2.3)"
    assert sweep._paper_cell(paper, False) == "15.4 (400K it)"
    assert sweep._paper_cell(None, True).startswith("n/a")
    assert sweep._paper_cell([], False) == "n/a (not reported for this size)"


def _gather_rank(rank, port, out):
    import torch.distributed as dist

    from reg.processes import gather_features
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    mine = list(range(rank, 5, 2))[::-1]  # unequal shares (3 and 2), rows not in index order
    feats = {"pool": np.array([[i, 10 * i] for i in mine], dtype=np.float32), "logits": np.array(mine)[:, None]}
    merged = gather_features(mine, feats, 2)
    out.put((rank, None if merged is None else {k: v.tolist() for k, v in merged.items()}))
    dist.destroy_process_group()


def test_features_are_gathered_to_rank_0_in_index_order():
    """reg.processes.gather_features, behind sweep.py and train.py's FID: two gloo processes."""
    results = dict(run_two_processes(_gather_rank))
    assert results[1] is None
    assert results[0] == {"pool": [[i, 10 * i] for i in range(5)], "logits": [[i] for i in range(5)]}


def test_results_without_sweep_json_are_refused(tmp_path):
    import sweep
    (tmp_path / "settings").mkdir()
    (tmp_path / "settings" / "sde-250-cfg-1.0.json").write_text("{}")
    with pytest.raises(ValueError, match="holds results but no sweep.json"):
        sweep.check_manifest(tmp_path, {k: 0 for k in sweep.MANIFEST_KEYS})
    assert not (tmp_path / "sweep.json").exists()


# What every stored metric of a sweep depends on besides its own sampler setting (the manifest's keys).
SWEEP_RESULT_SETTINGS = {
    "checkpoint": ({"path": "/other.pt", "size": 1, "mtime_ns": 1, "sha256_first_mib": "0" * 64}, "the weights"),
    "ema": (False, "EMA or raw weights"),
    "reference": ({"source": "/other.npz", "size": 1, "mtime_ns": 1}, "the FID reference batch"),
    "inception_weights_id": ("other", "the feature network"),
    "global_seed": (1, "the noise and classes of every image"),
    "num_samples": (5000, "FID is biased by the sample count"),
    "balanced": (True, "the classes"),
    "precision": ("fp64", "the sampler's dtype"),
    "tf32": (False, "matmul precision on GPU"),
    "vae": ("mse", "the decoder"),
    "latents_scale": (1.0, "latents are divided by it before decoding"),
    "path_type": ("cosine", "the score the SDE derives from the velocity"),
    "model": ("SiT-B/2", "the network"),
    "model_config": ({"model": "SiT-XL/2", "qk_norm": True}, "the network's other settings (qk-norm, fused attention)"),
}


def test_sweep_refuses_an_output_folder_made_with_any_other_setting(tmp_path):
    import sweep
    base = {"checkpoint": {"path": "/exps/ema.safetensors", "size": 10, "mtime_ns": 5, "sha256_first_mib": "f" * 64},
            "ema": True, "reference": {"source": "/ref.npz", "size": 3, "mtime_ns": 4}, "inception_weights_id": "pt",
            "global_seed": 0, "num_samples": 10_000, "balanced": False, "precision": "fp32", "tf32": True, "vae": "ema",
            "latents_scale": 0.18215, "path_type": "linear", "model": "SiT-XL/2", "model_config": {"model": "SiT-XL/2"}}
    sweep.check_manifest(tmp_path, base)  # writes sweep.json
    sweep.check_manifest(tmp_path, base)  # the same settings resume
    each_change_is_refused(lambda settings: sweep.check_manifest(tmp_path, settings), base, SWEEP_RESULT_SETTINGS)
