"""reg/export.py's model card (metadata, the FID's sample count, the code link, a usage snippet that runs offline
from the exported folder), the exported files' permissions, and --push-to-hub's errors: one line each."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from helpers import offline_hf_cache
from models.sit import SiT_models
from reg import export
from reg.pipeline import REGPipeline
from reg.utils import UserError

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def test_card_metadata_and_its_snippet_runs_offline_from_the_export(tiny_reg_ckpt, tmp_path, monkeypatch):
    """The card's Python snippet, run in a fresh interpreter against the exported folder in an offline HF cache
    (the repo id the card names), writes the pipeline's images for the card's sampling settings."""
    argv = [str(tiny_reg_ckpt), str(tmp_path / "tiny-reg"), "--fid", "3.25", "--fid-samples", "10000",
            "--sampling", "--mode unipc --num-steps 3 --cfg-scale 1.8 --guidance-high 0.9", "--dataset", "me/shapes",
            "--code-url", "https://example.org/reg-code", "--license", "apache-2.0"]
    args = export.parse_args(argv)
    args.push_to_hub = "someone/tiny-reg"  # the repo id the card names; nothing is uploaded (see main)
    folder = export.export(args.ckpt, args.out_dir, repo_id=args.push_to_hub, fid=args.fid,
                           fid_samples=args.fid_samples, sampling=args.sampling, dataset=args.dataset,
                           code_url=args.code_url, license=args.license)
    card = ModelCard.load(folder / "README.md")
    assert (card.data.license, card.data.pipeline_tag, card.data.datasets) == (
        "apache-2.0", "unconditional-image-generation", ["me/shapes"])
    assert card.data.library_name == "reg" and "class-conditional" in card.data.tags
    assert "| FID-10K | 3.25 |" in card.text and "FID-50K" not in card.text
    assert "git clone https://example.org/reg-code" in card.text and "[https://example.org/reg-code]" in card.text
    assert "generate.py --ckpt someone/tiny-reg --mode unipc --num-steps 3" in card.text

    cache = offline_hf_cache(tmp_path, monkeypatch, "someone/tiny-reg", folder)
    [snippet, _] = python_blocks(card.text)  # the usage snippet, then the bare SiT.from_pretrained
    work = tmp_path / "fresh"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", snippet], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(p.name for p in work.iterdir())
    assert written == ["class-0.png", "class-1.png"]  # 4 classes: the snippet samples classes 0 and 1

    pipe = REGPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe([0, 1], num_inference_steps=3, mode="unipc", guidance_scale=1.8, guidance_high=0.9, seed=0,
                    output_type="np").images
    from PIL import Image
    for i, name in enumerate(written):
        assert np.array_equal(np.asarray(Image.open(work / name)), expected[i]), name


def test_card_defaults_for_an_imagenet_model():
    """1000 classes: ImageNet-1k as the dataset, the snippet samples classes 207 and 360 with the paper's settings;
    without a code URL the card says so instead of a clone line; FID-50K is named as such."""
    torch.manual_seed(0)
    model = SiT_models["SiT-T/2"](input_size=4, num_classes=1000, z_dims=[32], encoder_depth=1, projector_dim=32)
    text = str(export.model_card(model, fid=1.8, code_url=None, repo_id="me/x"))
    card = ModelCard(text)
    assert card.data.datasets == [export.IMAGENET] and card.data.license == "mit"
    assert "| FID-50K | 1.8 |" in text and "git clone" not in text and "not recorded" in text
    snippet = python_blocks(text)[0]
    assert "class_labels=[207, 360], num_inference_steps=250, mode=\"sde\"" in snippet
    assert "guidance_scale=2.3, cls_guidance_scale=2.3" in snippet and "guidance_high=0.85" in snippet
    assert [export.fid_label(n) for n in (50_000, 10_000, 1234)] == ["FID-50K", "FID-10K", "FID-1,234"]
    # the class-level card metadata of SiT is not changed by a card (each card copies it)
    assert "class-conditional" not in (model._hub_mixin_info.model_card_data.tags or [])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_follow_the_umask(tiny_reg_ckpt, tmp_path, umask):
    """Like every file of ours (reg.utils.atomic_write): 0666 & ~umask, so 0644 under 022 (huggingface_hub's
    save_pretrained leaves model.safetensors 0600, unreadable for colleagues)."""
    old = os.umask(umask)
    try:
        folder = export.export(str(tiny_reg_ckpt), tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert modes == dict.fromkeys(["README.md", "config.json", "model.safetensors"], oct(0o666 & ~umask))


def run_export(*argv: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reg.export", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_push_to_hub_refusals_are_one_line_before_anything_is_written(tiny_reg_ckpt, tmp_path):
    """Offline, without a login, or a bad --sampling: one line, exit status 2, no folder written."""
    out = tmp_path / "out"
    no_login = {"HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": ""}
    cases = [(["--push-to-hub", "me/tiny"], {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_stub"}, "HF_HUB_OFFLINE is set"),
             (["--push-to-hub", "me/tiny"], {"HF_HUB_OFFLINE": "0", **no_login}, "needs a Hugging Face login"),
             (["--push-to-hub", "not a repo"], {"HF_HUB_OFFLINE": "0"}, "not a Hub repo id"),
             (["--sampling", "--mode sde --bogus 3"], {}, "unrecognized arguments: --bogus 3")]
    for extra, env, message in cases:
        done = run_export(str(tiny_reg_ckpt), str(out), *extra, env=env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (extra, done.stderr[-2000:])
        assert not out.exists()


def test_push_to_hub_failure_is_one_line_and_keeps_the_folder(tiny_reg_ckpt, tmp_path, monkeypatch, capsys):
    """The upload fails (no network here): a UserError naming the repo, the cause kept, the folder complete."""
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_stub")

    def unreachable(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")
    monkeypatch.setattr(huggingface_hub, "create_repo", unreachable)
    args = export.parse_args([str(tiny_reg_ckpt), str(tmp_path / "out"), "--push-to-hub", "me/tiny"])
    with pytest.raises(UserError, match=r"--push-to-hub me/tiny: the upload failed \(ConnectionError: "
                                               r"Failed to resolve 'huggingface.co'\); .* is complete") as e:
        export.main(args)
    assert "\n" not in str(e.value) and isinstance(e.value.__cause__, ConnectionError)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
