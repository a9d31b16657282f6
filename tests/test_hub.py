"""The Hub side: SiT's PyTorchModelHubMixin (save_pretrained / from_pretrained), Hub folders written from our
checkpoints (reg/export.py, `python -m reg.export`, with the model card), and generate.py / reg.loading taking
such a folder or a repo id from an offline HF cache (reg/hub.py). Tiny models only; no network."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import generate
from helpers import offline_hf_cache, save_tiny_reg_checkpoint
from models.sit import SiT, SiT_models
from reg import export
from reg.checkpoints import CheckpointDir
from reg.hub import is_repo_id, portable_vae_spec
from reg.loading import load_generator
from reg.run_identity import checkpoint_identity

KW = dict(input_size=4, num_classes=4, z_dims=[32], encoder_depth=1, projector_dim=64)


def tiny(**kw) -> SiT:
    torch.manual_seed(0)
    model = SiT_models["SiT-T/2"](**{**KW, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(model, n=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, 4, 4, generator=g), torch.rand(n, generator=g), torch.tensor([0, 3])[:n],
            torch.randn(n, model.cls_dim, generator=g))


def test_mixin_round_trip_keeps_keys_and_loads_strictly(tmp_path):
    model = tiny()
    # the kwargs it was built with are recorded, JSON values only, and rebuild the same architecture
    config = json.loads(json.dumps(model._hub_mixin_config))
    assert config["depth"] == 6 and config["z_dims"] == [32] and config["patch_size"] == 2
    assert SiT(**config).state_dict().keys() == model.state_dict().keys()
    model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["README.md", "config.json", "model.safetensors"]
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert sorted(stored) == sorted(model.state_dict())  # the authors' names, nothing renamed or dropped
    back = SiT.from_pretrained(tmp_path / "m")
    assert not back.training
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    x, t, y, c = inputs(model)
    torch.testing.assert_close(back(x, t, y, cls_token=c)[0], model(x, t, y, cls_token=c)[0], rtol=0, atol=0)

    # strict: weights of another size or with a missing key are refused (the mixin's default is not strict)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "projector_dim": 32}))
    with pytest.raises(Exception, match="projectors"):
        SiT.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "qk_norm": True}))
    with pytest.raises(Exception, match="q_norm"):
        SiT.from_pretrained(tmp_path / "m")


def test_mixin_survives_deepcopy():
    """train.py's EMA is a deepcopy; torch.compile of the mixin class: test_model's compile test."""
    model = tiny()
    ema = copy.deepcopy(model)
    assert ema._hub_mixin_config == model._hub_mixin_config and ema is not model
    x, t, y, c = inputs(model)
    torch.testing.assert_close(ema(x, t, y, cls_token=c)[0], model(x, t, y, cls_token=c)[0], rtol=0, atol=0)


def test_export_writes_config_card_and_portable_vae(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny()
    sd = model.state_dict()
    vae_dir = tmp_path / "vaes" / "my-vae"
    config = {"model": "SiT-T/2", "encoder_depth": 1, "path_type": "cosine", "latents_scale": 0.18215,
              "vae": str(vae_dir), "enc_type": "dinov2-vit-b", "resolution": 32}
    CheckpointDir(tmp_path / "ckpts").save(1234, model=sd, ema=sd, opt={}, config=config, args={})
    out = export.main(export.parse_args([str(tmp_path / "ckpts" / "0001234.pt"), "hubdir", "--fid", "2.5",
                                   "--sampling", "--mode unipc --num-steps 20"]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vae"] == os.path.join("vaes", "my-vae")  # relative, never this machine's absolute path
    assert (cfg["model"], cfg["path_type"], cfg["enc_type"], cfg["train_steps"]) == ("SiT-T/2", "cosine",
                                                                                     "dinov2-vit-b", 1234)
    card = (out / "README.md").read_text()
    for text in ("REG", "SiT-T/2", "dinov2-vit-b", "1,234", "| FID-50K | 2.5 |", "--mode unipc --num-steps 20",
                 "library_name: reg", "cosine"):
        assert text in card, text
    loaded, loaded_cfg, *_ = load_generator(str(out), decoder=False)
    assert loaded_cfg["path_type"] == "cosine" and loaded_cfg["vae"] == cfg["vae"]
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # --push-to-hub: the repo is created and the folder uploaded (the hub calls are stubbed: no network)
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # else refused before the export (tests/test_export.py)
    monkeypatch.setenv("HF_TOKEN", "hf_stub")
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: calls.append(("create", repo, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)) or "url")
    export.main(export.parse_args([str(tmp_path / "ckpts" / "0001234.pt"), "pushed", "--push-to-hub",
                             "me/tiny", "--private"]))
    assert calls == [("create", "me/tiny", {"private": True, "exist_ok": True}),
                     ("upload", {"repo_id": "me/tiny", "folder_path": "pushed"})]
    assert "--ckpt me/tiny" in (tmp_path / "pushed" / "README.md").read_text()
    # a checkpoint's VAE from an HF cache snapshot is recorded by its hub id
    snap = tmp_path / "hf" / "hub" / "models--stabilityai--sd-vae-ft-ema" / "snapshots" / ("a" * 40)
    assert portable_vae_spec(str(snap)) == "stabilityai/sd-vae-ft-ema"
    assert portable_vae_spec("ema") == "ema" and portable_vae_spec("org/vae") == "org/vae"


def test_generate_takes_a_folder_or_a_repo_id_with_the_same_images(tmp_path, monkeypatch):
    ckpt = save_tiny_reg_checkpoint(tmp_path / "ema_0000010.safetensors", perturb=0.05)
    folder = export.export(str(ckpt), tmp_path / "tiny-reg")
    offline_hf_cache(tmp_path, monkeypatch, "someone/tiny-reg", folder)
    monkeypatch.chdir(tmp_path)

    def images(spec, name):
        argv = ["--ckpt", spec, "--sample-dir", "out", "--run-name", name, "--num-fid-samples", "2",
                "--num-steps", "2", "--mode", "unipc", "--device", "cpu", "--cfg-scale", "1.5"]
        generate.main(generate.parse_args(argv))
        with np.load(tmp_path / "out" / f"{name}.npz") as data:
            return data["arr_0"]

    reference = images(str(ckpt), "file")
    for spec in ("tiny-reg", "someone/tiny-reg", "hf:someone/tiny-reg", "hf:someone/tiny-reg/model.safetensors"):
        assert np.array_equal(images(spec, spec.replace("/", "_").replace(":", "_")), reference), spec
    assert generate.checkpoint_name("someone/tiny-reg") == "tiny-reg"
    assert generate.checkpoint_name("tiny-reg/") == generate.checkpoint_name("hf:someone/tiny-reg") == "tiny-reg"
    assert checkpoint_identity("someone/tiny-reg")["path"].endswith("model.safetensors")
    # a repo id fetches config.json with the weights (a download of the weights alone would lose the metadata)
    from reg import hub
    asked = []
    real_get = hub._hub_get
    monkeypatch.setattr(hub, "_hub_get", lambda repo, f: asked.append(f) or real_get(repo, f))
    assert load_generator("someone/tiny-reg", decoder=False).config["vae"] == "pixel-unshuffle"
    assert asked == ["config.json", "model.safetensors"]
    back = SiT.from_pretrained("someone/tiny-reg", local_files_only=True)  # the mixin itself, from the cache
    assert back.state_dict().keys() == load_file(str(folder / "model.safetensors")).keys()

    # A bare OWNER/NAME is a repo id only when no such local path exists.
    assert is_repo_id("someone/tiny-reg") and not is_repo_id("./someone/tiny-reg")
    assert not is_repo_id("a/b.pt") and not is_repo_id("a/b/c")
    (tmp_path / "someone").mkdir()
    (tmp_path / "someone" / "tiny-reg").symlink_to(folder)
    assert not is_repo_id("someone/tiny-reg")
    with pytest.raises(FileNotFoundError, match="read as a Hub repo id"):
        load_generator("nobody/nothing", decoder=False)


def test_training_config_records_the_vae_without_an_absolute_path(tmp_path, monkeypatch):
    import types

    import train
    monkeypatch.chdir(tmp_path)
    encoder = types.SimpleNamespace(embed_dim=32)
    for vae_flag, dataset_name, expected in [
            (None, str(tmp_path / "vae-dir"), "vae-dir"),
            (str(tmp_path / "hf" / "models--org--my-vae" / "snapshots" / ("c" * 40)), None, "org/my-vae"),
            (None, "stabilityai/sd-vae-ft-mse", "stabilityai/sd-vae-ft-ema")]:  # SD-VAE latents decode with ft-ema
        args = train.parse_args(["--model", "SiT-T/2", *(["--vae", vae_flag] if vae_flag else [])])
        dataset = types.SimpleNamespace(vae_stride=8, vae_info={"name": dataset_name, "latent_channels": 4,
                                                                "scaling_factor": 0.18215})
        config = train.model_config(args, dataset, [encoder])
        assert config["vae"] == expected
        # the VAE that encoded the data is recorded as portably (None: the dataset names none)
        assert config["encode_vae"] == (dataset_name and {str(tmp_path / "vae-dir"): "vae-dir"}.get(dataset_name,
                                                                                                     dataset_name))
