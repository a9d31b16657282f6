"""Checkpoint I/O shared by train.py and generate.py.

Formats:
  * ours, training:  OUTPUT/EXP/checkpoints/{step:07d}.pt = {"model", "ema", "steps", "config", "args"}
                     (tensors, numbers, strings and lists only: loads with weights_only=True)
  * ours, release:   ema_{step:07d}.safetensors + ema_{step:07d}.json (the model config)
  * official REG/REPA .pt files: {"model", "ema", "opt", "steps", "args": argparse.Namespace}; the
    Namespace is allow-listed for the weights_only unpickler, nothing else is.
  * the HF hub repo Martinser/REG ("hf:Martinser/REG" or "hf:Martinser/REG/FILE").

Writes are atomic: a temporary file in the same folder, fsync, then os.replace, so a process
killed at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from models.hub import hub_offline
from utils import atomic_json_dump, atomic_torch_save, atomic_write  # noqa: F401  (re-exported)
from models.sit import SIZES, SiT, build_model, model_depth, parse_model_name

OFFICIAL_HUB_REPO = "Martinser/REG"
# Keyword arguments of models.sit.SiT that a config may carry.
MODEL_KWARGS = ("input_size", "in_channels", "num_classes", "z_dims", "encoder_depth", "projector_dim",
                "use_cls_token", "cls_token_dim", "qk_norm", "fused_attn", "class_dropout_prob")


# ----------------------------------------------------------------------------- safe loading

def torch_load(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True; argparse.Namespace (in official files) is the one allowed class."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise RuntimeError(f"could not load checkpoint {path} safely (weights_only=True): {e}") from None


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the wrappers' prefixes: DDP's 'module.' and torch.compile's '_orig_mod.'."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def save_training_checkpoint(path: str | os.PathLike, *, model: dict, ema: dict, opt: dict, steps: int,
                             config: dict, args: dict) -> None:
    """The original's layout (model, ema, opt, steps, args), with args and config as plain dicts."""
    atomic_torch_save({"model": model, "ema": ema, "opt": opt, "steps": int(steps), "config": config,
                       "args": args}, path)


def export_safetensors(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """Write the shareable weights (.safetensors) and the model config (.json beside it)."""
    from safetensors.torch import save_file
    path = Path(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt", "config": json.dumps(config)}))
    atomic_json_dump(config, path.with_suffix(".json"))


# ----------------------------------------------------------------------------- model configs

def model_kwargs(config: dict) -> dict:
    return {k: config[k] for k in MODEL_KWARGS if k in config}


def build_model_from_config(config: dict) -> SiT:
    return build_model(config["model"], **model_kwargs(config))


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """Read what a SiT state_dict fixes: sizes, patch, channels, projectors, class token, qk-norm."""
    if "x_embedder.proj.weight" not in sd:
        raise ValueError("this does not look like a SiT state_dict (no x_embedder.proj.weight)")
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    size = next((name for name, (d, h, _) in SIZES.items() if (d, h) == (depth, hidden)), None)
    if size is None:
        raise ValueError(f"no registry size has depth {depth} and width {hidden}")
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


# ----------------------------------------------------------------------------- resolving and loading

WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
# Flags that only restate what a checkpoint fixes: checked against it, never used to rebuild.
CHECKED_FLAGS = {"model": "--model", "num_classes": "--num-classes", "qk_norm": "--qk-norm",
                 "cls_token_dim": "--cls", "z_dims": "--projector-embed-dims", "encoder_depth": "--encoder-depth"}
# Runtime settings: an explicit value wins over the checkpoint's metadata (they do not change the weights).
RUNTIME_KEYS = ("fused_attn", "path_type")


def _hub_get(repo: str, fname: str) -> Path:
    """hf_hub_download, from the cache first (works offline), then from the network unless offline."""
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(repo_id=repo, filename=fname, local_files_only=True))
    except Exception as cached_error:
        if hub_offline():
            raise FileNotFoundError(f"{fname} of {repo} is not in the HF cache and HF_HUB_OFFLINE is set "
                                    f"({cached_error})") from cached_error
    return Path(hf_hub_download(repo_id=repo, filename=fname))


def _hub_weight_file(repo: str) -> str:
    """The one weight file of a hub repo: from the cached snapshot if there is one, else listed online."""
    from huggingface_hub import list_repo_files, snapshot_download
    try:
        snapshot = Path(snapshot_download(repo_id=repo, local_files_only=True))
        files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES))
    except Exception as cached_error:
        if hub_offline():
            raise FileNotFoundError(f"{repo} is not in the HF cache and HF_HUB_OFFLINE is set "
                                    f"({cached_error})") from cached_error
        files = [f for f in list_repo_files(repo) if f.endswith(WEIGHT_SUFFIXES)]
    if len(files) != 1:
        raise ValueError(f"{repo} holds {len(files)} weight files {files}; name one: hf:{repo}/FILE")
    return files[0]


def resolve_checkpoint(spec: str) -> Path:
    """A local path, or 'hf:OWNER/REPO[/FILE]' from the HF cache (downloaded into it on first use)."""
    if not spec.startswith("hf:"):
        path = Path(os.path.expanduser(spec))
        if not path.exists():
            raise FileNotFoundError(
                f"checkpoint {spec} does not exist. Give a local .pt/.safetensors file, or "
                f"'hf:{OFFICIAL_HUB_REPO}' for the released REG weights.")
        return path
    parts = spec[3:].split("/")
    repo, fname = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return _hub_get(repo, fname or _hub_weight_file(repo))
    except ValueError:
        raise
    except Exception as e:
        raise FileNotFoundError(
            f"could not fetch {spec} from the HF hub ({type(e).__name__}: {e}). On a machine with network "
            f"access run\n  hf download {repo} {fname or 'FILE'}\nthen copy the HF cache (~/.cache/huggingface) "
            f"here, or pass the downloaded file to --ckpt.") from e


def checkpoint_identity(spec: str) -> dict:
    """What tells two checkpoint files apart cheaply: resolved path, size, mtime and the sha256 of
    the first MiB. generate.py stores it so a resumed run cannot mix images of two checkpoints."""
    path = resolve_checkpoint(spec).resolve()
    stat = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256_first_mib": head}


def convert_legacy(sd: dict[str, torch.Tensor], encoder_depth: int | None = None) -> dict[str, torch.Tensor]:
    """REPA's old layout: blocks.{i} (the encoder part) + decoder_blocks.{j} -> blocks.{j + encoder_depth}
    (REPA utils.py load_legacy_checkpoints). encoder_depth defaults to the number of blocks.* present."""
    encoder_blocks = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if encoder_depth is not None and encoder_depth != encoder_blocks:
        raise ValueError(f"--legacy: --encoder-depth {encoder_depth} but the checkpoint has {encoder_blocks} "
                         f"encoder blocks (blocks.*) before its decoder_blocks.*")
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "decoder_blocks":
            parts = ["blocks", str(int(parts[1]) + encoder_blocks), *parts[2:]]
        out[".".join(parts)] = value
    return out


def load_weights(spec: str, *, use_ema: bool = True, legacy: bool = False,
                 encoder_depth: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint in any supported format -> (state_dict, partial config from its metadata).

    legacy=True renames REPA's old decoder_blocks.* keys (see convert_legacy)."""
    path = resolve_checkpoint(spec)
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        sd = load_file(str(path))
        side = path.with_suffix(".json")
        if side.is_file():
            meta = json.loads(side.read_text())
        else:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("config", "{}"))
    else:
        obj = torch_load(path)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
        if "ema" in obj or "model" in obj:
            key = "ema" if (use_ema and "ema" in obj) or "model" not in obj else "model"
            sd = obj[key]
            if isinstance(obj.get("config"), dict):
                meta.update(obj["config"])
            elif "args" in obj:
                meta.update(_config_from_official_args(obj["args"]))
        else:
            sd = obj  # a bare state_dict
    sd = clean_state_dict(sd)
    if legacy:
        sd = convert_legacy(sd, encoder_depth)
    elif any(k.startswith("decoder_blocks.") for k in sd):
        raise ValueError(f"{spec} has REPA's old decoder_blocks.* keys: pass --legacy (legacy=True)")
    return sd, meta


def load_generator(spec: str, *, use_ema: bool = True, overrides: dict | None = None, expect: dict | None = None,
                   legacy: bool = False, device: torch.device | str = "cpu") -> tuple[SiT, dict]:
    """Build the model a checkpoint describes and load it strictly; returns (model in eval mode, config).

    One rule per kind of setting: what the weights fix (sizes, classes, projectors, class token,
    qk-norm) > the checkpoint's metadata > defaults; `expect` (config key -> value, None = not
    given) restates such settings and any disagreement is an error naming the flag; `overrides`
    holds runtime settings (RUNTIME_KEYS: fused_attn, path_type) that win over the metadata.
    encoder_depth, which official weights do not record, is taken from `expect` when the
    checkpoint has no metadata for it.
    """
    expect = {k: v for k, v in (expect or {}).items() if v is not None}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = (set(expect) - set(CHECKED_FLAGS)) | (set(overrides) - set(RUNTIME_KEYS))
    if unknown:
        raise TypeError(f"load_generator: unknown expect/overrides keys {sorted(unknown)}")
    sd, meta = load_weights(spec, use_ema=use_ema, legacy=legacy, encoder_depth=expect.get("encoder_depth"))
    inferred = infer_config(sd)
    config = {"encoder_depth": 8, "fused_attn": True, "path_type": "linear", "latents_scale": 0.18215,
              "vae": "ema"}
    if "encoder_depth" in expect and "encoder_depth" not in meta:
        config["encoder_depth"] = expect["encoder_depth"]
    config.update(meta)
    if "num_classes" in meta and int(meta["num_classes"]) != inferred["num_classes"]:
        raise ValueError(
            f"{spec}: its settings say {meta['num_classes']} classes but the label table has "
            f"{inferred['num_classes'] + 1} rows, not num_classes + 1 (trained without label dropout, so without "
            f"the null row?); such weights cannot be sampled with guidance and are not supported")
    config.update(inferred)
    config.update(overrides)
    depth = model_depth(config["model"])
    if "encoder_depth" in expect and not 1 <= expect["encoder_depth"] <= depth:
        raise ValueError(f"--encoder-depth {expect['encoder_depth']} is outside [1, {depth}] for {config['model']}")
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
            raise ValueError(f"{CHECKED_FLAGS[key]} {value} does not match the checkpoint {spec} ({actual})")
    if "resolution" not in config:
        config["resolution"] = config["input_size"] * 8
    model = build_model_from_config(config)
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval(), config
