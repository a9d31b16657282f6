"""reg/prefetch.py: one command fills the caches, then the loaders find everything with HF_HUB_OFFLINE=1.

No network: a fake "internet" serves tiny weights the test makes (a tiny SD-VAE, a random DINOv2-S, seeded random
Inception weights, a tiny REG Hub folder, a small reference batch) through the download functions the loaders
call (huggingface_hub.hf_hub_download, models.vae's diffusers call, torch.hub.download_url_to_file), writing
into a temporary HF cache and torch.hub folder."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import huggingface_hub
import huggingface_hub.constants as hub_constants
from helpers import save_tiny_reg_checkpoint, save_tiny_vae
from models import vae as vae_module
from reg import export, prefetch
from reg.utils import UserError

COMMIT = "3" * 40
ENCODER_REPO = "timm/vit_small_patch14_dinov2.lvd142m"


def put_in_cache(cache: Path, repo: str, name: str, data: bytes) -> None:
    """One file of `repo` at its main revision, in huggingface_hub's cache layout."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    target = folder / "snapshots" / COMMIT / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """What the fake internet serves: {hub repo: {file: bytes}} and {url: bytes}."""
    import timm
    from safetensors.torch import save_file

    from evaluations.inception import INCEPTION_URL, _random_state_dict
    d = tmp_path_factory.mktemp("remote")
    vae = Path(save_tiny_vae(str(d / "vae")))
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(d / "dino.safetensors"))
    reg = export.export(str(save_tiny_reg_checkpoint(d / "ema_0000010.safetensors", perturb=0.05)), d / "tiny-reg")
    torch.save(_random_state_dict(), d / "inception.pth")
    images = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    np.savez(d / "ref.npz", images)
    hub = {"stabilityai/sd-vae-ft-ema": {f.name: f.read_bytes() for f in vae.iterdir()},
           ENCODER_REPO: {"model.safetensors": (d / "dino.safetensors").read_bytes()},
           "someone/tiny-reg": {f.name: f.read_bytes() for f in reg.iterdir()}}
    urls = {INCEPTION_URL: (d / "inception.pth").read_bytes(),
            f"{prefetch.ADM_REF_BATCHES}/256/VIRTUAL_imagenet256_labeled.npz": (d / "ref.npz").read_bytes()}
    return hub, urls, vae


@pytest.fixture
def internet(remote, tmp_path, monkeypatch):
    """Empty caches in tmp_path, HF_HUB_OFFLINE unset, and the fake downloads; returns the list of what was
    downloaded and the cache folder (a test may point `where[0]` elsewhere: files then land in the wrong place)."""
    hub, urls, _ = remote
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("REG_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("REG_ENC_WEIGHTS", raising=False)
    downloads, where = [], [cache]

    def serve(repo: str, name: str) -> None:
        if prefetch.os.environ.get("HF_HUB_OFFLINE"):
            raise OSError("the network was used with HF_HUB_OFFLINE=1")
        if name not in hub.get(repo, {}):
            raise OSError(f"404: {repo}/{name}")
        downloads.append(f"{repo}/{name}")
        put_in_cache(where[0], repo, name, hub[repo][name])

    real_download = huggingface_hub.hf_hub_download

    def hf_hub_download(repo_id, filename, local_files_only=False, **kw):
        if not local_files_only:  # downloaded, and returned from where it was put
            serve(repo_id, filename)
            kw["cache_dir"] = str(where[0])
        return real_download(repo_id=repo_id, filename=filename, local_files_only=True, **kw)

    real_from_pretrained = vae_module._from_pretrained

    def from_pretrained(repo, local_files_only=False, **kw):  # diffusers' download, for the VAE
        if not local_files_only:
            for name in hub.get(repo, {"config.json": None}):
                serve(repo, name)
            kw["cache_dir"] = str(where[0])
        return real_from_pretrained(repo, local_files_only=True, **kw)

    def download_url_to_file(url, dst, progress=True):
        if url not in urls:
            raise OSError(f"404: {url}")
        downloads.append(url)
        Path(dst).write_bytes(urls[url])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(vae_module, "_from_pretrained", from_pretrained)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)
    return downloads, where


PAPER = ["--vae", "ema", "--enc-type", "dinov2-vit-s", "--inception", "--ref-batch", "256",
         "--ckpt", "hf:someone/tiny-reg"]


def test_after_prefetch_the_loaders_find_everything_offline(internet, remote, tmp_path, monkeypatch, capsys):
    downloads, _ = internet
    monkeypatch.chdir(tmp_path)
    done = prefetch.main(prefetch.parse_args(PAPER))
    assert [state for _, _, state in done] == ["fetched"] * 5
    assert len(downloads) == len(set(downloads)) == 2 + 1 + 1 + 1 + 2  # each file once: VAE (2), DINOv2, ...
    where = {item: path for item, path, _ in done}
    assert where["--ref-batch 256"] == "VIRTUAL_imagenet256_labeled.npz"  # where eval.sh's REF_BATCH looks
    assert where["--inception"] == str(tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    assert where["--vae ema"].startswith(str(tmp_path / "hf-cache" / "models--stabilityai--sd-vae-ft-ema"))
    assert "every item above loads with HF_HUB_OFFLINE=1" in capsys.readouterr().out

    # a compute node: no network at all, HF_HUB_OFFLINE=1; every loader finds its file, with the content served
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    downloads.clear()
    from evaluations.inception import build_inception
    from evaluations.npz import inspect_batch
    from models.encoders import load_encoder
    from models.vae import load_vae
    from reg.loading import load_generator
    hub, urls, vae_dir = remote
    z = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(load_vae("ema").decode(z), load_vae(str(vae_dir)).decode(z), rtol=0, atol=0)
    encoder = load_encoder("dinov2-vit-s", resolution=32)
    assert encoder.vit.blocks[0].attn.qkv.weight.abs().sum() > 0
    inception = build_inception(None, verbose=False)
    assert inception.weights_id == "sha256:" + hashlib.sha256(next(iter(urls.values()))).hexdigest()
    assert load_generator("hf:someone/tiny-reg", decoder=False).config["model"] == "SiT-T/2"
    assert inspect_batch("VIRTUAL_imagenet256_labeled.npz").image_shape == (256, 256, 3)
    assert downloads == []

    # prefetch again: everything is found where it is, nothing is downloaded
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert [state for _, _, state in prefetch.main(prefetch.parse_args(PAPER))] == ["cached"] * 5
    assert downloads == []


def test_a_file_fetched_where_the_loader_does_not_look_is_an_error(internet, tmp_path):
    """The check that makes drift impossible: fetched into one cache, looked up in another (a cache
    variable that differs between the download and the loader) fails on the login node, not on the cluster."""
    downloads, where = internet
    where[0] = tmp_path / "another-cache"
    with pytest.raises(UserError, match="--vae ema: fetched, but not found with HF_HUB_OFFLINE=1"):
        prefetch.main(prefetch.parse_args(["--vae", "ema"]))
    assert downloads  # it was downloaded, into the wrong place


def test_missing_items_and_bad_files_are_one_line_errors(internet, tmp_path, monkeypatch):
    downloads, _ = internet
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="nothing to fetch"):
        prefetch.main(prefetch.parse_args([]))
    with pytest.raises(UserError, match="unknown encoder 'dinov9'"):  # checked before anything is fetched
        prefetch.main(prefetch.parse_args(["--vae", "ema", "--enc-type", "dinov2-vit-s,dinov9"]))
    assert downloads == []
    with pytest.raises(UserError, match="--ckpt hf:someone/absent: could not fetch it"):
        prefetch.main(prefetch.parse_args(["--ckpt", "hf:someone/absent"]))
    with pytest.raises(UserError, match="--ref-batch 512: downloading .*VIRTUAL_imagenet512.npz failed"):
        prefetch.main(prefetch.parse_args(["--ref-batch", "512"]))
    # a reference batch cut short (a download killed mid-way, copied by hand) is named, not trusted
    prefetch.main(prefetch.parse_args(["--ref-batch", "256"]))
    ref = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    ref.write_bytes(ref.read_bytes()[:-1000])
    with pytest.raises(UserError, match="VIRTUAL_imagenet256_labeled.npz is not a readable npz"):
        prefetch.main(prefetch.parse_args(["--ref-batch", "256"]))
    np.savez(ref, np.zeros((2, 64, 64, 3), np.uint8))  # another resolution's images under this name
    with pytest.raises(UserError, match=r"images of shape \(64, 64, 3\), not \(256, 256, 3\)"):
        prefetch.main(prefetch.parse_args(["--ref-batch", "256"]))
    shutil.rmtree(tmp_path / "hf-cache", ignore_errors=True)
