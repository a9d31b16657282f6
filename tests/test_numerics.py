"""The last numeric differences from the authors' code, closed: --cfg-prob's meaning, and which encoder gives
REG's class token when --enc-type names several."""
from __future__ import annotations

from types import SimpleNamespace

import torch

import train
from models.sit import CLASS_DROPOUT_PROB, SiT_models


def _config(*flags: str) -> dict:
    args = train.parse_args(["--method", "sit", "--model", "SiT-T/2", "--resolution", "32", "--num-classes", "4",
                             *flags])
    data = SimpleNamespace(vae_stride=8, vae_info={"name": "pixel-unshuffle", "latent_channels": 192,
                                                   "scaling_factor": 1.0})
    return train.model_config(args, data, [])


def test_cfg_prob_feeds_only_legacy_the_model_always_drops_at_0_1():
    """REG/REPA train.py: --cfg-prob reaches the model only as the unused `use_cfg`; the SiT keeps its default
    class_dropout_prob=0.1 (and so its null row), and --legacy drops labels once more with p = --cfg-prob."""
    assert CLASS_DROPOUT_PROB == 0.1
    for prob in ("0", "0.1", "0.3"):
        config = _config("--cfg-prob", prob)
        assert config["class_dropout_prob"] == 0.1
    model = SiT_models["SiT-T/2"](input_size=4, num_classes=4, z_dims=[], use_cls_token=False)
    assert model.y_embedder.dropout_prob == 0.1 and model.y_embedder.embedding_table.num_embeddings == 5
    torch.manual_seed(0)
    y = torch.zeros(4000, dtype=torch.long)
    dropped = (model.y_embedder(y, train=True) == model.y_embedder.embedding_table.weight[4]).all(1).float().mean()
    assert 0.08 < dropped < 0.12


def test_resumed_run_keeps_its_stored_label_dropout():
    """A run of ours started with --cfg-prob 0 (then the model's dropout) continues with dropout 0; official
    checkpoints (no config) and runs at 0.1 are untouched."""
    lines = []
    log = SimpleNamespace(info=lines.append)
    for ckpt, want in (({"official": False, "config": {"class_dropout_prob": 0.0}}, 0.0),
                       ({"official": False, "config": {"class_dropout_prob": 0.1}}, 0.1),
                       ({"official": False, "config": {}}, 0.1),
                       ({"official": True, "config": None}, 0.1)):
        model = SiT_models["SiT-T/2"](input_size=4, num_classes=4, z_dims=[], use_cls_token=False)
        train.keep_label_dropout(ckpt, model, log)
        assert model.y_embedder.dropout_prob == want
    assert len(lines) == 1 and "label dropout 0.0 kept" in lines[0]
