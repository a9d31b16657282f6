"""Checkpoint I/O shared by train.py and generate.py.

Formats:
  * ours, training:  OUTPUT/EXP/checkpoints/{step:07d}.pt = {"model", "ema", "steps", "config", "args"}
                     (tensors, numbers, strings and lists only: loads with weights_only=True)
  * ours, release:   ema_{step:07d}.safetensors + ema_{step:07d}.json (the model config)
  * official REG/REPA .pt files: {"model", "ema", "opt", "steps", "args": argparse.Namespace}; the
    Namespace is allow-listed for the weights_only unpickler, nothing else is.
  * the HF hub repo Martinser/REG ("hf:Martinser/REG" or "hf:Martinser/REG/FILE").
  * Hub folders (SiT.save_pretrained, models/hub.py export): DIR/config.json + DIR/model.safetensors, as a
    local DIR, or a Hub repo id OWNER/NAME (also "hf:OWNER/NAME"): a bare OWNER/NAME is a repo id when no
    local path of that name exists (write ./OWNER/NAME for a local folder that does not exist yet).

Writes are atomic: a temporary file in the same folder, fsync, then os.replace, so a process
killed at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

from models.hub import hub_offline
from utils import UserError, atomic_json_dump, atomic_torch_save, atomic_write, clean_stale_tmp  # noqa: F401
from utils import safe_globals
from models.vae import SD_VAE_SCALING_FACTOR
from models.sit import SIZES, SiT, build_model, model_depth

OFFICIAL_HUB_REPO = "Martinser/REG"
# Keyword arguments of models.sit.SiT that a config may carry.
MODEL_KWARGS = ("input_size", "in_channels", "num_classes", "z_dims", "encoder_depth", "projector_dim",
                "use_cls_token", "cls_token_dim", "qk_norm", "fused_attn", "class_dropout_prob")


# ----------------------------------------------------------------------------- safe loading

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, incomplete or with non-finite weights."""


class NonFiniteCheckpointError(CheckpointError, UserError):
    """Weights with NaN/inf: never written, never loaded or resumed from (no silent fallback past one either).
    A UserError too: the message names the file and the tensors, and the entry points print it as one line."""


def _non_finite(name: str, sd: dict[str, torch.Tensor]) -> str | None:
    """None when every floating tensor of `sd` is finite, else a message naming the first bad keys."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not bad:
        return None
    return f"the {name} weights are not finite ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})"


def torch_load(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True; argparse.Namespace (in official files) is the one allowed class."""
    try:
        with safe_globals([argparse.Namespace]):  # utils' shim: torch 2.4 has no scoped form
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from e
    except pickle.UnpicklingError as e:
        # torch's message ends with advice to drop weights_only; a checkpoint must never need that
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and plain data, "
                              f"which are not loaded: {first}") from e
    except Exception as e:  # truncated zip, bad magic, disk errors
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a torch file): "
                              f"{type(e).__name__}: {e}") from e


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the wrappers' prefixes: DDP's 'module.' and torch.compile's '_orig_mod.'."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def export_safetensors(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """Write the shareable weights (.safetensors) and the model config (.json beside it)."""
    from safetensors.torch import save_file
    path = Path(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt", "config": json.dumps(config, allow_nan=False)}))
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
HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"  # a Hub folder (huggingface_hub's names)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
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


def is_repo_id(spec: str) -> bool:
    """A bare OWNER/NAME that names no local path: read as a Hub repo id (see the module docstring)."""
    return (REPO_ID.fullmatch(spec) is not None and not spec.endswith(WEIGHT_SUFFIXES)
            and not os.path.exists(os.path.expanduser(spec)))


def _hub_folder(repo: str) -> Path | None:
    """The snapshot folder of a Hub-folder repo (config.json + model.safetensors), None for other repos."""
    try:
        config, weights = _hub_get(repo, HUB_CONFIG), _hub_get(repo, HUB_WEIGHTS)
        return weights.parent if config.parent == weights.parent else None
    except Exception:
        return None


def resolve_checkpoint(spec: str) -> Path:
    """A local file or Hub folder, or 'hf:OWNER/REPO[/FILE]' / a bare repo id OWNER/REPO from the HF cache
    (downloaded into it on first use). A Hub-folder repo resolves to its snapshot folder."""
    if not spec.startswith("hf:") and not is_repo_id(spec):
        path = Path(os.path.expanduser(spec))
        if not path.exists():
            raise FileNotFoundError(
                f"checkpoint {spec} does not exist. Give a local .pt/.safetensors file or Hub folder, a Hub repo "
                f"id OWNER/NAME, or 'hf:{OFFICIAL_HUB_REPO}' for the released REG weights.")
        return path
    parts = spec.removeprefix("hf:").split("/")
    repo, fname = "/".join(parts[:2]), "/".join(parts[2:])
    folder = None if fname else _hub_folder(repo)
    if folder is not None:
        return folder
    try:
        return _hub_get(repo, fname or _hub_weight_file(repo))
    except ValueError:
        raise
    except Exception as e:
        raise FileNotFoundError(
            f"could not fetch {spec} from the HF hub ({type(e).__name__}: {e}). On a machine with network "
            f"access run\n  hf download {repo} {fname or 'FILE'}\nthen copy the HF cache (~/.cache/huggingface) "
            f"here, or pass the downloaded file to --ckpt."
            + ("" if spec.startswith("hf:") else f" ({spec} is no local path, so it was read as a Hub repo id.)")
        ) from e


def checkpoint_identity(spec: str) -> dict:
    """What tells two checkpoint files apart cheaply: resolved path, size, mtime and the sha256 of
    the first MiB. generate.py stores it so a resumed run cannot mix images of two checkpoints."""
    path = resolve_checkpoint(spec).resolve()
    if path.is_dir():  # a Hub folder: its weights
        path = path / HUB_WEIGHTS
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


def load_hub_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, config.json) of a Hub folder; its config holds SiT's keyword arguments and our metadata."""
    from safetensors.torch import load_file
    missing = [name for name in (HUB_CONFIG, HUB_WEIGHTS) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {path} has no {' or '.join(missing)}: expected a folder "
                                f"written by SiT.save_pretrained or `python -m models.hub export`")
    return load_file(str(path / HUB_WEIGHTS)), json.loads((path / HUB_CONFIG).read_text())


def load_weights(spec: str, *, use_ema: bool = True, legacy: bool = False,
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
        from safetensors.torch import load_file
        sd = load_file(str(path))
        side = path.with_suffix(".json")
        if path.name == HUB_WEIGHTS and not side.is_file():
            side = path.with_name(HUB_CONFIG)  # a Hub folder's weights, named by hf:OWNER/NAME/model.safetensors
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
            sd, which = obj[key], key
            if isinstance(obj.get("config"), dict):
                meta.update(obj["config"])
            elif "args" in obj:
                meta.update(_config_from_official_args(obj["args"]))
        else:
            sd = obj  # a bare state_dict
    sd = clean_state_dict(sd)
    if problem := _non_finite(which, sd):  # NaN weights would sample black images, or train from NaN
        raise NonFiniteCheckpointError(f"refusing checkpoint {path}: {problem}")
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
    config = {"encoder_depth": 8, "fused_attn": True, "path_type": "linear", "latents_scale": SD_VAE_SCALING_FACTOR,
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


# ----------------------------------------------------------------------------- training checkpoint folders

class CheckpointDir:
    """OUTPUT/EXP/checkpoints, the one place that knows how train.py lays it out:

        {step:07d}.pt                 model, ema, steps, config, args: the original's path and keys (its eval.sh
                                      samples from it); written last, so its presence marks a complete checkpoint;
                                      kept at every --checkpointing-steps
        {step:07d}.opt.pt             the optimizer state; only the newest --keep-last are kept
        ema_{step:07d}.safetensors    the EMA weights to share and sample from (+ .json, the model config)
        abandoned-<time>/             checkpoints after a step the run was resumed from (never deleted)

    Checkpoints written by the original code hold the optimizer state inside {step:07d}.pt; they resume too.
    """

    def __init__(self, path: str | os.PathLike, log: Callable[[str], None] = print):
        self.path, self.log = Path(path), log

    def pt(self, step: int) -> Path:
        return self.path / f"{step:07d}.pt"

    def opt_path(self, step: int) -> Path:
        return self.path / f"{step:07d}.opt.pt"

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        if not self.path.is_dir():
            return []
        return sorted(int(f.name[:7]) for f in self.path.glob("[0-9]" * 7 + ".pt"))

    def clean_stale(self) -> list[Path]:
        """Remove the temporary files of writes that a killed run left half done."""
        return clean_stale_tmp(self.path)

    def save(self, step: int, *, model: dict, ema: dict, opt: dict, config: dict, args: dict) -> None:
        """Write one checkpoint (main process only). Non-finite weights are never written."""
        for name, sd in (("model", model), ("ema", ema)):
            if problem := _non_finite(name, sd):
                raise NonFiniteCheckpointError(f"refusing to save checkpoint {self.pt(step)}: {problem}")
        atomic_torch_save({"opt": opt, "steps": int(step)}, self.opt_path(step))
        export_safetensors(self.path / f"ema_{step:07d}.safetensors", ema, config)
        atomic_torch_save({"model": model, "ema": ema, "steps": int(step), "config": config, "args": args},
                          self.pt(step))  # last: marks the checkpoint complete

    def prune_optimizer_states(self, keep_last: int) -> list[Path]:
        """Delete the optimizer states of all but the newest `keep_last` checkpoints. Model and EMA weights
        are never deleted, and the newest checkpoint is never touched."""
        steps = self.steps()
        keep = set(steps[-max(keep_last, 1):])
        removed = [self.opt_path(s) for s in steps if s not in keep and self.opt_path(s).is_file()]
        for f in removed:
            f.unlink()
        return removed

    def set_aside_after(self, step: int) -> Path | None:
        """Move every checkpoint file of a step after `step` into abandoned-<time>/ (a run resumed from an
        earlier step starts a new lineage; the old one must neither be resumed nor pruned into it)."""
        later = [f for f in self.path.glob("*") if f.is_file() and (m := re.search(r"(\d{7})", f.name))
                 and int(m.group(1)) > step]
        if not later:
            return None
        dest = self.path / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.mkdir(exist_ok=True)
        for f in later:
            os.replace(f, dest / f.name)
        return dest

    def load(self, step: int) -> dict:
        """Read checkpoint `step` for resuming: model, ema, opt, steps, and `official` (made by the original
        code). Raises when it is unreadable, has no optimizer state, or holds non-finite weights."""
        ckpt = torch_load(self.pt(step))
        if not isinstance(ckpt, dict) or not {"model", "ema", "steps"} <= set(ckpt):
            raise CheckpointError(f"{self.pt(step)} is not a training checkpoint (needs model, ema and steps)")
        ckpt["official"] = not isinstance(ckpt.get("config"), dict)
        if "opt" not in ckpt:
            if not self.opt_path(step).is_file():
                raise CheckpointError(
                    f"the optimizer state of step {step} ({self.opt_path(step).name}) was pruned (--keep-last); "
                    f"resume from a step that has one, or start a new run with --init-from {self.pt(step)}")
            ckpt["opt"] = torch_load(self.opt_path(step))["opt"]
        for name in ("model", "ema"):
            if problem := _non_finite(name, ckpt[name]):
                raise NonFiniteCheckpointError(f"refusing to resume from {self.pt(step)}: {problem}; "
                                               "pick an earlier one with --resume-step")
        return ckpt

    def load_for_resume(self, resume_step: int = 0) -> dict | None:
        """--resume-step N loads exactly N; 0 loads the newest complete checkpoint, falling back to the next
        older one (with a warning naming both) when a file is truncated or unreadable. None: start afresh."""
        available = self.steps()
        if resume_step:
            if resume_step not in available:
                raise FileNotFoundError(f"--resume-step {resume_step}: {self.pt(resume_step)} does not exist "
                                        f"(have {available or 'none'})")
            return self.load(resume_step)
        failed: list[str] = []
        for step in reversed(available):
            try:
                ckpt = self.load(step)
            except NonFiniteCheckpointError:
                raise
            except CheckpointError as e:
                failed.append(f"{self.pt(step)} ({e})")
                self.log(f"WARNING: cannot resume from {self.pt(step)}: {e}")
                continue
            if failed:
                self.log(f"WARNING: resuming from the newest intact checkpoint {self.pt(step)} instead of "
                         f"{self.pt(available[-1])}")
            return ckpt
        if failed:
            raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(failed))
        return None
