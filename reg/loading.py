"""The one loader of a generator: a checkpoint in any supported format -> the SiT it describes, loaded
strictly, with its config and the VAE that decodes its latents.

`load_generator` serves generate.py, sweep.py, train.py's FID and `python -m reg.export`; `read_weights` reads
the state dict alone (train.py --init-from). The rules (which weights of a file, what wins over what, legacy
keys) are in docs/design.md#checkpoint-formats.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from models.sit import SIZES, SiT, build_model, model_depth
from models.vae import SD_VAE_SCALING_FACTOR, config_decoding_vae, load_vae
from reg.checkpoints import CheckpointError, NonFiniteCheckpointError, clean_state_dict, non_finite, torch_load
from reg.hub import HUB_CONFIG, HUB_WEIGHTS, resolve_checkpoint
from reg.utils import UserError

# Keyword arguments of models.sit.SiT that a config may carry.
MODEL_KWARGS = ("input_size", "in_channels", "num_classes", "z_dims", "encoder_depth", "projector_dim",
                "use_cls_token", "cls_token_dim", "qk_norm", "fused_attn", "class_dropout_prob")


# ----------------------------------------------------------------------------- model configs

def model_kwargs(config: dict) -> dict:
    return {k: config[k] for k in MODEL_KWARGS if k in config}


def build_model_from_config(config: dict) -> SiT:
    return build_model(config["model"], **model_kwargs(config))


def infer_config(sd: dict[str, torch.Tensor], source: str = "this") -> dict:
    """Read what a SiT state_dict fixes: sizes, patch, channels, projectors, class token, qk-norm."""
    if "x_embedder.proj.weight" not in sd:
        raise UserError(f"{source} does not look like a SiT state_dict (no x_embedder.proj.weight)")
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    size = next((name for name, (d, h, _) in SIZES.items() if (d, h) == (depth, hidden)), None)
    if size is None:
        raise UserError(f"{source}: no registry size has depth {depth} and width {hidden}")
    use_cls = "cls_projectors2.weight" in sd
    n_tokens = sd["pos_embed"].shape[1] - int(use_cls)
    grid = int(round(n_tokens ** 0.5))
    n_proj = len({int(m.group(1)) for k in sd if (m := re.match(r"projectors\.(\d+)\.", k))})
    cfg = {
        "model": f"SiT-{size}/{p}",
        "input_size": grid * p,
        "in_channels": in_ch,
        # the table always holds num_classes + 1 rows: the last is the null label of guidance
        "num_classes": sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        "class_dropout_prob": 0.1,
        "z_dims": [sd[f"projectors.{k}.4.weight"].shape[0] for k in range(n_proj)],
        "projector_dim": sd["projectors.0.0.weight"].shape[0] if n_proj else 2048,
        "use_cls_token": use_cls,
        "qk_norm": "blocks.0.attn.q_norm.weight" in sd,
    }
    if use_cls:
        cfg["cls_token_dim"] = sd["cls_projectors2.weight"].shape[1]
    return cfg


def _config_from_official_args(args: Any) -> dict:
    """Pick the settings an official Namespace (or our args dict) holds that the weights don't."""
    get = (lambda k: args.get(k)) if isinstance(args, dict) else (lambda k: getattr(args, k, None))
    out = {}
    for key in ("encoder_depth", "fused_attn", "path_type", "resolution", "enc_type", "num_classes"):
        if get(key) is not None:
            out[key] = get(key)
    return out
# Flags that only restate what a checkpoint fixes: checked against it, never used to rebuild.
CHECKED_FLAGS = {"model": "--model", "num_classes": "--num-classes", "qk_norm": "--qk-norm",
                 "cls_token_dim": "--cls", "z_dims": "--projector-embed-dims", "encoder_depth": "--encoder-depth"}
# Runtime settings: an explicit value wins over the checkpoint's metadata (they do not change the weights).
RUNTIME_KEYS = ("fused_attn", "path_type")


def convert_legacy(sd: dict[str, torch.Tensor], encoder_depth: int | None = None) -> dict[str, torch.Tensor]:
    """REPA's old layout: blocks.{i} (the encoder part) + decoder_blocks.{j} -> blocks.{j + encoder_depth}
    (REPA utils.py load_legacy_checkpoints). encoder_depth defaults to the number of blocks.* present."""
    encoder_blocks = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if encoder_depth is not None and encoder_depth != encoder_blocks:
        raise UserError(f"--legacy: --encoder-depth {encoder_depth} but the checkpoint has {encoder_blocks} "
                         f"encoder blocks (blocks.*) before its decoder_blocks.*")
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "decoder_blocks":
            parts = ["blocks", str(int(parts[1]) + encoder_blocks), *parts[2:]]
        out[".".join(parts)] = value
    return out


def load_hub_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, config.json) of a Hub folder; its config holds SiT's keyword arguments and our metadata."""
    missing = [name for name in (HUB_CONFIG, HUB_WEIGHTS) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {path} has no {' or '.join(missing)}: expected a folder "
                                f"written by SiT.save_pretrained or `python -m reg.export`")
    return read_safetensors(path / HUB_WEIGHTS), read_config_json(path / HUB_CONFIG)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors; a truncated or foreign file is a CheckpointError naming it."""
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # SafetensorError (a bad header, a short file), or an OSError reading it
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated, or not a safetensors file): {e}") from e


def read_config_json(path: Path, text: str | None = None) -> dict:
    """A checkpoint's config (a JSON object: the file, or `text` stored inside it); malformed is a CheckpointError."""
    try:
        config = json.loads(path.read_text() if text is None else text)
    except ValueError as e:
        raise CheckpointError(f"the config of checkpoint {path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"the config of checkpoint {path} is a JSON {type(config).__name__}, not an object")
    return config


def read_weights(spec: str, *, use_ema: bool = True, legacy: bool = False,
                 encoder_depth: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint in any supported format -> (state_dict, partial config from its metadata).

    legacy=True renames REPA's old decoder_blocks.* keys (see convert_legacy). Weights with a NaN or inf
    are refused (NonFiniteCheckpointError naming the tensors)."""
    path = resolve_checkpoint(spec)
    meta: dict = {}
    which = "stored"  # which weights of the file: the EMA or the raw training weights of a .pt
    if path.is_dir():
        sd, meta = load_hub_folder(path)
    elif path.suffix == ".safetensors":
        from safetensors import safe_open
        sd = read_safetensors(path)
        side = path.with_suffix(".json")
        if path.name == HUB_WEIGHTS and not side.is_file():
            side = path.with_name(HUB_CONFIG)  # a Hub folder's weights, named by hf:OWNER/NAME/model.safetensors
        if side.is_file():
            meta = read_config_json(side)
        else:
            with safe_open(str(path), framework="pt") as f:
                meta = read_config_json(path, (f.metadata() or {}).get("config", "{}"))
    else:
        obj = torch_load(path)
        if not isinstance(obj, dict):
            raise UserError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
        if "ema" in obj or "model" in obj:
            key = "ema" if (use_ema and "ema" in obj) or "model" not in obj else "model"
            sd, which = obj[key], key
            if isinstance(obj.get("config"), dict):
                meta.update(obj["config"])
            elif "args" in obj:
                meta.update(_config_from_official_args(obj["args"]))
        else:
            sd = obj  # a bare state_dict
    sd = clean_state_dict(sd)
    if problem := non_finite(which, sd):  # NaN weights would sample black images, or train from NaN
        raise NonFiniteCheckpointError(f"refusing checkpoint {path}: {problem}")
    if legacy:
        sd = convert_legacy(sd, encoder_depth)
    elif any(k.startswith("decoder_blocks.") for k in sd):
        raise UserError(f"{spec} has REPA's old decoder_blocks.* keys: pass --legacy (legacy=True)")
    return sd, meta


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], *, source: str, hint: str = "") -> None:
    """model.load_state_dict(sd, strict=True); weights that do not fit the model (another size, number of
    classes, projector...) are a UserError naming `source` and the keys and shapes that differ."""
    try:
        model.load_state_dict(sd, strict=True)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{source}: {e}" + (f"; {hint}" if hint else "")) from e


def metadata_disagreements(inferred: dict, meta: dict) -> list[str]:
    """The settings a checkpoint's metadata (our config, a Hub config.json) states otherwise than its weights
    fix, as "key: config X, weights Y"; the mixin's size keys (depth, hidden_size, ...) included."""
    depth, hidden, heads = SIZES[inferred["model"].split("-")[1].split("/")[0]]
    fixed = {**inferred, "depth": depth, "hidden_size": hidden, "num_heads": heads,
             "patch_size": int(inferred["model"].rsplit("/", 1)[1])}
    if not inferred["z_dims"]:
        fixed.pop("projector_dim")  # no projector: nothing fixes its width
    norm = lambda v: [int(z) for z in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    return [f"{k}: config {meta[k]!r}, weights {fixed[k]!r}" for k in fixed
            if k in meta and k != "class_dropout_prob" and norm(meta[k]) != norm(fixed[k])]


def resolve_config(spec: str, inferred: dict, meta: dict, *, expect: dict, overrides: dict) -> dict:
    """The config of a generator. One rule per kind of setting: what the weights fix (`inferred`: sizes,
    classes, projectors, class token, qk-norm) > the checkpoint's metadata (`meta`) > defaults; `expect`
    (config key -> value) restates such settings and any disagreement is an error naming the flag;
    `overrides` holds runtime settings (RUNTIME_KEYS: fused_attn, path_type) that win over the metadata.
    encoder_depth, which official weights do not record, is taken from `expect` when the checkpoint has no
    metadata for it."""
    config = {"encoder_depth": 8, "fused_attn": True, "path_type": "linear", "latents_scale": SD_VAE_SCALING_FACTOR,
              "vae": "ema"}
    if "encoder_depth" in expect and "encoder_depth" not in meta:
        config["encoder_depth"] = expect["encoder_depth"]
    config.update(meta)
    if "num_classes" in meta and int(meta["num_classes"]) != inferred["num_classes"]:
        raise UserError(
            f"{spec}: its settings say {meta['num_classes']} classes but the label table has "
            f"{inferred['num_classes'] + 1} rows, not num_classes + 1 (trained without label dropout, so without "
            f"the null row?); such weights cannot be sampled with guidance and are not supported")
    if differ := metadata_disagreements(inferred, meta):
        raise UserError(f"{spec}: its config disagrees with its weights ({'; '.join(differ)}): the weights or the "
                        f"config file were replaced; export the checkpoint again")
    config.update(inferred)
    config.update(overrides)
    depth = model_depth(config["model"])
    if "encoder_depth" in expect and not 1 <= expect["encoder_depth"] <= depth:
        raise UserError(f"--encoder-depth {expect['encoder_depth']} is outside [1, {depth}] for {config['model']}")
    config["encoder_depth"] = min(int(config["encoder_depth"]), depth)
    if not config["use_cls_token"]:
        config.pop("cls_token_dim", None)
    for key, value in expect.items():
        actual = config.get(key)
        if key == "cls_token_dim" and not config["use_cls_token"]:
            continue  # the original always passes --cls; a REPA/SiT checkpoint has no class token to check
        if key == "z_dims":
            value, actual = [int(z) for z in value], list(actual)
        if value != actual:
            raise UserError(f"{CHECKED_FLAGS[key]} {value} does not match the checkpoint {spec} ({actual})")
    if "resolution" not in config:
        config["resolution"] = config["input_size"] * 8
    return config


# ----------------------------------------------------------------------------- the loader


class LoadedGenerator(NamedTuple):
    """A generator ready to sample (eval mode, no grad, in its compute dtype), its config and its decoder."""

    model: SiT
    config: dict
    codec: Any  # models.vae.load_vae's decoder; None when loaded with decoder=False
    vae_spec: str  # the VAE that decodes its latents
    latents_scale: float


def load_generator(spec: str, *, use_ema: bool = True, legacy: bool = False, expect: dict | None = None,
                   overrides: dict | None = None, device: torch.device | str = "cpu", precision: str = "fp32",
                   vae: str | None = None, decoder: bool = True) -> LoadedGenerator:
    """Build the model a checkpoint describes (any format `read_weights` reads), load it strictly, and load
    its decoder: `vae`, else the checkpoint's (sd-vae-ft-ema for SD-VAE latents, as the authors' generate.py).

    `expect` and `overrides` (None values = not given) are checked / applied by `resolve_config`. The model
    is in float64 for precision fp64, else float32 (bf16 runs under autocast: seeded_images.autocast_dtype).
    decoder=False skips the VAE (exporting weights needs none)."""
    expect = {k: v for k, v in (expect or {}).items() if v is not None}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = (set(expect) - set(CHECKED_FLAGS)) | (set(overrides) - set(RUNTIME_KEYS))
    if unknown:
        raise TypeError(f"load_generator: unknown expect/overrides keys {sorted(unknown)}")
    sd, meta = read_weights(spec, use_ema=use_ema, legacy=legacy, encoder_depth=expect.get("encoder_depth"))
    config = resolve_config(spec, infer_config(sd, spec), meta, expect=expect, overrides=overrides)
    model = build_model_from_config(config)
    load_into(model, sd, source=f"checkpoint {spec}")
    dtype = torch.float64 if precision == "fp64" else torch.float32
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae_spec = vae or config_decoding_vae(config)
    codec = None
    if decoder:
        codec = load_vae(vae_spec, device=device, dtype=dtype)
        if codec.latent_channels != model.in_channels:
            raise UserError(f"VAE {vae_spec!r} has {codec.latent_channels} latent channels but the model "
                            f"expects {model.in_channels}")
    return LoadedGenerator(model, config, codec, vae_spec, float(config["latents_scale"]))
