"""Hub folders of our models, and the model card: `python -m reg.export`.

A Hub folder is what `SiT.save_pretrained(dir)` writes (huggingface_hub's PyTorchModelHubMixin):

    config.json        SiT's keyword arguments + the sampling metadata (models.sit.HUB_METADATA_KEYS:
                       model name, path_type, resolution, latents_scale, vae, enc_type, train_steps)
    model.safetensors  the state_dict (the same keys as our .pt files and the authors' checkpoints)
    README.md          the model card (model_card below)

`SiT.from_pretrained(dir or OWNER/NAME)` rebuilds the model from it; generate.py and sweep.py take the folder or
the repo id as --ckpt. Write one from any checkpoint generate.py loads, and optionally push it:

    python -m reg.export exps/NAME/checkpoints/0400000.pt hub/NAME --fid 1.86 \\
        --sampling "--mode sde --num-steps 250 --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.85"
    python -m reg.export exps/NAME/checkpoints/0400000.pt hub/NAME --push-to-hub OWNER/NAME
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from reg.checkpoints import CheckpointError
from reg.hub import portable_vae_spec
from reg.utils import ArgumentParser, HelpFormatter, UserError, atomic_write, finite_float, run_main

# The paper's sampler settings (REG's eval recipe): shown on the card when no other settings are given.
PAPER_SAMPLING = "--mode sde --num-steps 250 --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.85"


def hub_config(model, config: dict, *, train_steps: int | None = None) -> dict:
    """config.json of a Hub folder: the model's own keyword arguments (recorded by the mixin when it was
    built) and the metadata generate.py needs from `config` (load_generator's)."""
    from models.sit import HUB_METADATA_KEYS
    out = dict(model._hub_mixin_config or {})
    out.update({k: config[k] for k in HUB_METADATA_KEYS if config.get(k) is not None})
    if "vae" in out:
        out["vae"] = portable_vae_spec(str(out["vae"]))
    if train_steps is not None:
        out["train_steps"] = int(train_steps)
    return out


def model_card(model, *, config: dict | None = None, fid: float | None = None, sampling: str | None = None,
               repo_id: str | None = None, **_unused):
    """The README.md of a Hub folder (huggingface_hub.ModelCard): method, model size, encoder, training steps,
    sampling settings and the FID when known. `export` writes it."""
    from huggingface_hub import ModelCard

    cfg = {**(model._hub_mixin_config or {}), **(config or {})}
    name = cfg.get("model") or f"SiT (depth {model.depth}, width {model.hidden_size}, patch {model.patch_size})"
    params = sum(p.numel() for p in model.parameters())
    resolution = cfg.get("resolution") or model.input_size * 8
    encoder = cfg.get("enc_type") or ("unknown" if model.use_cls_token else "none (no class token)")
    method = ("REG: SiT + REPA alignment + the entangled class token of a frozen vision encoder"
              if model.use_cls_token else "SiT / REPA (no class token)")
    steps = cfg.get("train_steps")
    ckpt = repo_id or "OWNER/NAME"
    card_data = model._hub_mixin_info.model_card_data
    rows = [("method", method), ("model", f"{name}, {params / 1e6:.1f}M parameters"),
            ("classes", f"{model.num_classes} (label {model.num_classes} is the null label of guidance)"),
            ("resolution", f"{resolution} x {resolution} ({model.in_channels} latent channels, "
                           f"{model.input_size} x {model.input_size} latents)"),
            ("encoder (REPA targets, class token)", encoder),
            ("training steps", f"{steps:,}" if steps is not None else "unknown"),
            ("interpolant", cfg.get("path_type", "linear")),
            ("VAE", f"{cfg.get('vae', 'unknown')} (latents scale {cfg.get('latents_scale', 'unknown')})"),
            ("FID-50K", f"{fid}" if fid is not None else "not measured"),
            ("sampling settings", f"`{sampling or PAPER_SAMPLING}`" + ("" if sampling else " (the paper's)"))]
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    text = f"""---
{card_data.to_yaml()}
---

# {name} trained with REG

Class-conditional image generator: REG (Representation Entanglement for Generation,
[arXiv 2507.01467](https://arxiv.org/abs/2507.01467)) jointly denoises the VAE latents and one class token
of a frozen vision encoder.

{table}

## Sampling

```bash
python generate.py --ckpt {ckpt} {sampling or PAPER_SAMPLING}
```

## Loading

```python
from models.sit import SiT
model = SiT.from_pretrained("{ckpt}")  # config.json + model.safetensors, strict
```
"""
    return ModelCard(text)


def export(ckpt: str, out_dir: str | os.PathLike, *, use_ema: bool = True, fid: float | None = None,
           sampling: str | None = None, repo_id: str | None = None, legacy: bool = False) -> Path:
    """Write the Hub folder of a checkpoint (any format generate.py loads) into out_dir; returns out_dir."""
    from reg.loading import load_generator

    model, config, *_ = load_generator(ckpt, use_ema=use_ema, legacy=legacy, decoder=False)
    match = re.search(r"(\d+)\.(pt|safetensors)$", os.path.basename(ckpt))
    out = Path(out_dir)
    full = hub_config(model, config, train_steps=int(match.group(1)) if match else None)
    model.save_pretrained(out, config=full)
    card = model_card(model, config=full, fid=fid, sampling=sampling, repo_id=repo_id)
    atomic_write(out / "README.md", card.save)  # over the mixin's generic card
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("ckpt", help="our .pt or ema_*.safetensors, an official .pt, hf:OWNER/REPO[/FILE], a Hub folder")
    p.add_argument("out_dir", help="folder to write (created; its files are replaced)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="the EMA weights (--no-ema: the raw training weights)")
    p.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA's old decoder_blocks.* checkpoints (as generate.py)")
    p.add_argument("--fid", type=finite_float(0), default=None, help="FID-50K to state on the card")
    p.add_argument("--sampling", type=str, default=None,
                   help=f"generate.py flags of that FID, shown on the card (default: the paper's: {PAPER_SAMPLING})")
    p.add_argument("--push-to-hub", type=str, default=None, metavar="OWNER/NAME",
                   help="also upload the folder to this Hub repo (needs `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before the checkpoint is read: the output folder and the Hub repo id."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"out_dir {args.out_dir} exists and is not a folder")
    if args.push_to_hub is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as e:
            raise UserError(f"--push-to-hub {args.push_to_hub!r}: {e}") from e
    elif args.private:
        raise UserError("--private applies to --push-to-hub: give a repo id too")


def push(out: Path, repo_id: str, private: bool) -> str:
    """Upload the folder; a refusal or an unreachable Hub is one line (the folder itself is already written)."""
    from huggingface_hub import create_repo, upload_folder
    try:
        create_repo(repo_id, private=private, exist_ok=True)
        return str(upload_folder(repo_id=repo_id, folder_path=str(out)))
    except Exception as e:  # offline mode, no token, no permission, no network: the Hub's own message says which
        raise UserError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {e}); {out} is written: push it "
                        f"later with `hf upload {repo_id} {out}`") from e


def main(args: argparse.Namespace) -> Path:
    check_args(args)
    out = export(args.ckpt, args.out_dir, use_ema=args.ema, fid=args.fid, sampling=args.sampling,
                 repo_id=args.push_to_hub, legacy=args.legacy)
    print(f"wrote {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
    if args.push_to_hub:
        print(f"pushed to {push(out, args.push_to_hub, args.private)}")
    return out


if __name__ == "__main__":
    run_main(main, parse_args, user_errors=(CheckpointError,))
