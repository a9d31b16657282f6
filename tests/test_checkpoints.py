"""Checkpoint files (reg/checkpoints.py, reg/utils.py's atomic writes): atomic writes, official files with a
pickled Namespace read without unpickling anything else, truncated files named, safetensors export. Loading a
generator from them (reg/loading.py, reg/hub.py): tests/test_loading.py."""
import argparse
import os

import pytest
import torch

from helpers import CHECKPOINT_SIT, checkpoint_sit
from reg.checkpoints import clean_state_dict, export_safetensors, torch_load
from reg.loading import load_generator
from reg.utils import atomic_torch_save


def test_official_checkpoint_with_namespace_loads_safely(tmp_path):
    model = checkpoint_sit()
    ema_sd = {k: v + 1 for k, v in model.state_dict().items()}
    ns = argparse.Namespace(model="SiT-T/2", encoder_depth=2, qk_norm=False, fused_attn=True, resolution=32,
                            path_type="linear", enc_type="dinov2-vit-s", cls=0.03)
    path = tmp_path / "official.pt"
    torch.save({"model": model.state_dict(), "ema": ema_sd, "opt": {}, "steps": 7, "args": ns}, path)
    obj = torch_load(path)  # weights_only with only argparse.Namespace allowed
    assert obj["args"].model == "SiT-T/2" and obj["steps"] == 7
    loaded, config, *_ = load_generator(str(path), decoder=False)
    assert config["model"] == "SiT-T/2" and config["encoder_depth"] == 2 and config["num_classes"] == 10
    assert config["use_cls_token"] and config["cls_token_dim"] == 32 and config["input_size"] == 4
    assert all(torch.equal(loaded.state_dict()[k], ema_sd[k]) for k in ema_sd)  # the EMA weights, by default
    raw, *_ = load_generator(str(path), use_ema=False, decoder=False)
    assert torch.equal(raw.state_dict()["pos_embed"], model.state_dict()["pos_embed"])
    assert not loaded.training


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"ema": checkpoint_sit().state_dict(), "args": Evil()}, path)
    with pytest.raises(RuntimeError, match="evil.pt holds Python objects") as err:
        torch_load(path)
    assert "weights_only=False" not in str(err.value)  # never advise loading unsafely
    assert isinstance(err.value.__cause__, Exception)  # the cause is kept


def test_truncated_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "0000002.pt"
    torch.save({"ema": checkpoint_sit().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(RuntimeError, match="0000002.pt is unreadable .truncated"):
        torch_load(path)


def test_safetensors_export_roundtrip_and_prefixes(tmp_path):
    model = checkpoint_sit()
    config = {"model": "SiT-T/2", **CHECKPOINT_SIT, "use_cls_token": True, "path_type": "cosine", "latents_scale": 1.0}
    export_safetensors(tmp_path / "ema.safetensors", model.state_dict(), config)
    loaded, cfg, *_ = load_generator(str(tmp_path / "ema.safetensors"), decoder=False)
    assert cfg["path_type"] == "cosine" and cfg["latents_scale"] == 1.0
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    (tmp_path / "ema.json").unlink()  # the config also travels inside the safetensors metadata
    _, cfg, *_ = load_generator(str(tmp_path / "ema.safetensors"), decoder=False)
    assert cfg["path_type"] == "cosine"
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert set(clean_state_dict(wrapped)) == set(model.state_dict())


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"steps": 1}, path)

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"steps": 2, "x": Boom()}, path)
    assert torch.load(path, weights_only=True) == {"steps": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_exported_safetensors_get_the_usual_file_mode(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this umask (0644 for the usual 022)
    export_safetensors(tmp_path / "ema.safetensors", checkpoint_sit().state_dict(), {"model": "SiT-T/2"})
    for f in ("ema.safetensors", "ema.json"):
        assert (tmp_path / f).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777, f
