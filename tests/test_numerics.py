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
    from reg.loading import MODEL_KWARGS
    for prob in ("0", "0.1", "0.3"):
        config = _config("--cfg-prob", prob)
        assert config["class_dropout_prob"] == 0.1
    assert set(MODEL_KWARGS) <= set(config) and config["qk_norm"] is False and _config("--qk-norm")["qk_norm"]
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


def test_class_token_comes_from_the_last_encoder():
    """REG train.py overwrites `cls_token` in its loop over --enc-type: the class token (target and width) is the
    last encoder's. Two random encoders of different widths (DINOv2-S 384, DINOv2-B 768), a REG model built
    from train.py's config, one forward with the target."""
    import warnings

    from loss import encoder_targets
    from models.encoders import load_encoders
    from reg.loading import build_model_from_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning
        encoders = load_encoders("dinov2-vit-s,dinov2-vit-b", weights="random", resolution=32)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    zs, cls = encoder_targets(encoders, images)
    assert [z.shape for z in zs] == [(2, 5, 384), (2, 5, 768)]
    assert torch.equal(cls, encoders[1](images)[0]) and torch.equal(cls, zs[1][:, 0])
    args = train.parse_args(["--model", "SiT-T/2", "--resolution", "32", "--num-classes", "4", "--encoder-depth", "2",
                             "--enc-type", "dinov2-vit-s,dinov2-vit-b"])
    data = SimpleNamespace(vae_stride=8, vae_info={"name": "pixel-unshuffle-lowpass", "latent_channels": 48,
                                                   "scaling_factor": 1.0})
    config = train.model_config(args, data, encoders)
    assert (config["z_dims"], config["cls_token_dim"]) == ([384, 768], 768)
    assert config["encoder_acts"] == {"dinov2-vit-s": "default", "dinov2-vit-b": "default"}  # recorded for resumes
    model = build_model_from_config(config)
    _, zs_pred, cls_v = model(torch.randn(2, 48, 4, 4), torch.rand(2), torch.zeros(2, dtype=torch.long), cls_token=cls)
    assert cls_v.shape == (2, 768) and [z.shape for z in zs_pred] == [z.shape for z in zs]


def test_old_multi_encoder_run_is_told_its_class_token_changed():
    lines = []
    log = SimpleNamespace(info=lines.append)
    old = {"use_cls_token": True, "enc_type": "dinov2-vit-b,dinov2reg-vit-b", "vae": "stabilityai/sd-vae-ft-mse"}
    for config, official in ((old, False), ({**old, "encode_vae": None}, False), ({**old, "enc_type": "dinov2-vit-b"},
                             False), (None, True)):
        train.warn_class_token_source({"official": official, "config": config}, log)
    assert len(lines) == 1 and "from the first encoder" in lines[0]


def test_a_run_resumed_with_other_encoder_activations_is_told():
    """Runs of ours from before `encoder_acts` was recorded ran CLIP-L and SigLIP 2 with timm's exact GELU; their
    towers now run QuickGELU and the tanh GELU, so a resume says that the targets changed. DINOv2 runs did not
    change; a recorded activation that differs from today's is told too."""
    lines = []
    log = SimpleNamespace(info=lines.append)
    old = {"use_cls_token": True, "enc_type": "dinov2-vit-b,clip-vit-L", "encode_vae": None}
    quiet = [{**old, "enc_type": "dinov2-vit-b"}, {**old, "encoder_acts": {"dinov2-vit-b": "default",
             "clip-vit-L": "quick_gelu"}}, {**old, "enc_type": None}, {**old, "enc_type": "not-an-encoder"}]
    for config in quiet:
        train.warn_encoder_activations({"official": False, "config": config}, log)
    train.warn_encoder_activations({"official": True, "config": None}, log)
    assert lines == []
    train.warn_encoder_activations({"official": False, "config": old}, log)
    train.warn_encoder_activations({"official": False, "config": {**old, "enc_type": "siglip2-vit-b", "encoder_acts":
                                    {"siglip2-vit-b": "gelu"}}}, log)
    assert len(lines) == 2 and "clip-vit-L: default -> quick_gelu" in lines[0] and "dinov2" not in lines[0]
    assert "siglip2-vit-b: gelu -> gelu_tanh" in lines[1]
