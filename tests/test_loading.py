"""Loading a generator (reg/loading.py, reg/hub.py): the config inferred from the weights, clear errors for
a missing file or Hub checkpoint, an offline HF cache, flags that restate the checkpoint, a label table
without its null row. The files themselves: tests/test_checkpoints.py."""
import argparse

import pytest
import torch

from helpers import checkpoint_sit
from models.sit import SiT_models
from reg.loading import infer_config, load_generator, read_weights
from reg.utils import atomic_torch_save


def test_infer_config_for_repa_and_plain_sit():
    repa = SiT_models["SiT-S/4"](input_size=16, z_dims=[768, 1024], encoder_depth=3, use_cls_token=False)
    cfg = infer_config(repa.state_dict())
    assert cfg["model"] == "SiT-S/4" and cfg["z_dims"] == [768, 1024] and not cfg["use_cls_token"]
    assert cfg["input_size"] == 16 and cfg["num_classes"] == 1000
    plain = SiT_models["SiT-T/8"](input_size=16, z_dims=[], use_cls_token=False, qk_norm=True)
    cfg = infer_config(plain.state_dict())
    assert cfg["z_dims"] == [] and cfg["qk_norm"] and cfg["model"] == "SiT-T/8"
    with pytest.raises(ValueError, match="does not look like a SiT"):
        infer_config({"foo": torch.zeros(1)})


def test_missing_and_hub_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist.*hf:Martinser/REG"):
        read_weights(str(tmp_path / "nope.pt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="hf download Martinser/REG last.pt"):
        read_weights("hf:Martinser/REG/last.pt")
    # a checkpoint of another size names the mismatch
    small = checkpoint_sit()
    bad = {k: v for k, v in small.state_dict().items()}
    bad["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    torch.save({"ema": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight: checkpoint \(3, 3\)"):
        load_generator(str(tmp_path / "bad.pt"), decoder=False)


def _hub_cache(tmp_path, monkeypatch, files: dict) -> None:
    """An offline HF cache holding Martinser/REG with `files`."""
    import huggingface_hub.constants as hub_constants
    cache = tmp_path / "hub"
    repo = cache / "models--Martinser--REG"
    commit = "1" * 40
    for name, obj in files.items():
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        torch.save(obj, repo / "snapshots" / commit / name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_checkpoint_works_offline_from_the_cache(tmp_path, monkeypatch):
    model = checkpoint_sit()
    ckpt = {"ema": model.state_dict(), "args": argparse.Namespace(model="SiT-T/2", encoder_depth=2)}
    _hub_cache(tmp_path, monkeypatch, {"last.pt": ckpt})
    for spec in ("hf:Martinser/REG/last.pt", "hf:Martinser/REG"):  # with and without the file name
        loaded, cfg, *_ = load_generator(spec, decoder=False)
        assert torch.equal(loaded.state_dict()["pos_embed"], model.state_dict()["pos_embed"])
        assert cfg["encoder_depth"] == 2
    # missing from the cache: the error names the command to fetch it and keeps the hub's reason
    with pytest.raises(FileNotFoundError, match="hf download Martinser/REG other.pt") as info:
        read_weights("hf:Martinser/REG/other.pt")
    assert info.value.__cause__ is not None and "HF_HUB_OFFLINE" in str(info.value)


def test_hub_repo_with_several_weight_files_needs_a_name(tmp_path, monkeypatch):
    sd = checkpoint_sit().state_dict()
    _hub_cache(tmp_path, monkeypatch, {"a.pt": {"ema": sd}, "b.pt": {"ema": sd}})
    with pytest.raises(ValueError, match=r"holds 2 weight files \['a.pt', 'b.pt'\]; name one"):
        read_weights("hf:Martinser/REG")


def test_flags_restating_the_checkpoint_are_checked_runtime_flags_win(tmp_path):
    from reg.run_identity import checkpoint_identity

    model = checkpoint_sit()
    path = tmp_path / "ours.pt"
    atomic_torch_save({"ema": model.state_dict(), "config": {"model": "SiT-T/2", "encoder_depth": 2,
                                                             "fused_attn": True, "path_type": "linear"}}, path)
    _, cfg, *_ = load_generator(str(path), decoder=False, expect={"model": "SiT-T/2", "num_classes": 10, "z_dims": [32],
                                               "cls_token_dim": 32, "qk_norm": False, "encoder_depth": 2})
    assert cfg["num_classes"] == 10
    for key, value, flag in (("num_classes", 11, "--num-classes 11"), ("model", "SiT-S/2", "--model SiT-S/2"),
                             ("z_dims", [768], r"--projector-embed-dims \[768\]"), ("cls_token_dim", 768, "--cls 768"),
                             ("encoder_depth", 3, "--encoder-depth 3")):
        with pytest.raises(ValueError, match=f"{flag} does not match the checkpoint"):
            load_generator(str(path), expect={key: value}, decoder=False)
    model2, cfg2, *_ = load_generator(str(path), overrides={"fused_attn": False, "path_type": "cosine"}, decoder=False)
    assert cfg2["fused_attn"] is False and cfg2["path_type"] == "cosine"
    assert not any(b.attn.fused_attn for b in model2.blocks)
    with pytest.raises(TypeError, match="unknown expect/overrides keys"):
        load_generator(str(path), overrides={"model": "SiT-S/2"}, decoder=False)
    # the identity changes with the content, not only with the path
    before = checkpoint_identity(str(path))
    atomic_torch_save({"ema": {k: v + 1 for k, v in model.state_dict().items()}}, path)
    after = checkpoint_identity(str(path))
    assert before["path"] == after["path"] and before["sha256_first_mib"] != after["sha256_first_mib"]


def test_label_table_without_null_row_is_refused(tmp_path):
    """A label table without the null row (num_classes rows against its metadata; DiT with dropout 0 writes such;
    REG and REPA never do: their SiT always trains with dropout 0.1) is refused."""
    sd = checkpoint_sit().state_dict()
    sd["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"][:10]  # 10 classes, no null row
    torch.save({"ema": sd, "args": argparse.Namespace(model="SiT-T/2", num_classes=10, encoder_depth=2)},
               tmp_path / "nonull.pt")
    with pytest.raises(ValueError, match="10 classes but the label table has 10 rows"):
        load_generator(str(tmp_path / "nonull.pt"), decoder=False)
