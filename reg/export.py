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
import shlex
from pathlib import Path

from reg.checkpoints import CheckpointError
from reg.hub import HUB_CONFIG, HUB_WEIGHTS, REPO_ID, hub_offline, portable_vae_spec
from reg.utils import (ArgumentParser, HelpFormatter, UserError, atomic_json_dump, atomic_write, finite_float,
                       run_main)

# The paper's sampler settings (REG's eval recipe): shown on the card when no other settings are given.
PAPER_SAMPLING = "--mode sde --num-steps 250 --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.85"
IMAGENET = "ILSVRC/imagenet-1k"  # the Hub's ImageNet-1k: the card's dataset for 1000-class models
PIPELINE_TAG = "unconditional-image-generation"


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


def model_card(model, *, config: dict | None = None, fid: float | None = None, fid_samples: int = 50_000,
               sampling: str | None = None, repo_id: str | None = None, license: str = "mit",
               dataset: str | None = None, code_url: str | None = None, **_unused):
    """The README.md of a Hub folder (huggingface_hub.ModelCard): metadata (license, pipeline tag, dataset), method,
    model size, encoder, training steps, sampling settings, the FID with its sample count when known, a link to the
    code and a usage snippet (REGPipeline) that runs from a fresh install. `export` writes it."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = {**(model._hub_mixin_config or {}), **(config or {})}
    name = cfg.get("model") or f"SiT (depth {model.depth}, width {model.hidden_size}, patch {model.patch_size})"
    if dataset is None and model.num_classes == 1000:
        dataset = IMAGENET
    # The Hub has no class-conditional task: unconditional-image-generation is its task of image generators
    # without a text or image input (docs/sampling.md#the-hub); the tags say class-conditional.
    base = model._hub_mixin_info.model_card_data.to_dict()  # the class's library_name and tags, copied
    card_data = ModelCardData(**{**base, "tags": [*base.get("tags", []), "class-conditional"]}, license=license,
                              pipeline_tag=PIPELINE_TAG, datasets=[dataset] if dataset else None)
    rows = _card_rows(model, cfg, name, fid=fid, fid_samples=fid_samples, sampling=sampling, dataset=dataset,
                      code_url=code_url)
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    ckpt = repo_id or "OWNER/NAME"
    text = f"""---
{card_data.to_yaml()}
---

# {name} trained with REG

Class-conditional image generator: REG (Representation Entanglement for Generation,
[arXiv 2507.01467](https://arxiv.org/abs/2507.01467)) jointly denoises the VAE latents and one class token
of a frozen vision encoder.

{table}

{_usage(model, ckpt, sampling or PAPER_SAMPLING, code_url)}
## Loading the network alone

```python
from models.sit import SiT
model = SiT.from_pretrained("{ckpt}")  # config.json + model.safetensors, strict
```
"""
    return ModelCard(text)


def _card_rows(model, cfg: dict, name: str, *, fid: float | None, fid_samples: int, sampling: str | None,
               dataset: str | None, code_url: str | None) -> list[tuple[str, str]]:
    """The card's table: what the model is, how it was trained and sampled, and its FID."""
    params = sum(p.numel() for p in model.parameters())
    resolution = cfg.get("resolution") or model.input_size * 8
    encoder = cfg.get("enc_type") or ("unknown" if model.use_cls_token else "none (no class token)")
    method = ("REG: SiT + REPA alignment + the entangled class token of a frozen vision encoder"
              if model.use_cls_token else "SiT / REPA (no class token)")
    steps = cfg.get("train_steps")
    return [("method", method), ("model", f"{name}, {params / 1e6:.1f}M parameters"),
            ("classes", f"{model.num_classes} (label {model.num_classes} is the null label of guidance)"),
            ("training data", dataset or "not stated"),
            ("resolution", f"{resolution} x {resolution} ({model.in_channels} latent channels, "
                           f"{model.input_size} x {model.input_size} latents)"),
            ("encoder (REPA targets, class token)", encoder),
            ("training steps", f"{steps:,}" if steps is not None else "unknown"),
            ("interpolant", cfg.get("path_type", "linear")),
            ("VAE", f"{cfg.get('vae', 'unknown')} (latents scale {cfg.get('latents_scale', 'unknown')})"),
            (fid_label(fid_samples), f"{fid}" if fid is not None else "not measured"),
            ("sampling settings", f"`{sampling or PAPER_SAMPLING}`" + ("" if sampling else " (the paper's)")),
            ("code", f"[{code_url}]({code_url})" if code_url else "not recorded (`python -m reg.export --code-url`)")]


def fid_label(samples: int) -> str:
    """FID-50K for 50,000 samples, FID-10K, ...; FID-1,234 for a count that is no multiple of 1000."""
    return f"FID-{samples // 1000}K" if samples % 1000 == 0 else f"FID-{samples:,}"


def _usage(model, ckpt: str, sampling: str, code_url: str | None) -> str:
    """The card's usage section: install, then REGPipeline with the card's sampling settings."""
    flags = sampling_flags(sampling)  # the card's settings are generate.py flags: its parser reads them
    labels = [207, 360] if model.num_classes > 360 else list(range(min(2, model.num_classes)))
    install = (f"git clone {code_url} reg-code && cd reg-code\npip install -r requirements.txt" if code_url else
               "# in a checkout of the code this model was exported with (see `code` above)\n"
               "pip install -r requirements.txt")
    heun = ", heun=True" if flags.heun and flags.mode == "ode" else ""
    return f"""## Sampling

```bash
{install}
```

```python
import torch
from reg.pipeline import REGPipeline

pipe = REGPipeline.from_pretrained("{ckpt}", device="cuda" if torch.cuda.is_available() else "cpu")
out = pipe(class_labels={labels}, num_inference_steps={flags.num_steps}, mode="{flags.mode}"{heun},
           guidance_scale={flags.cfg_scale}, cls_guidance_scale={flags.cls_cfg_scale},
           guidance_low={flags.guidance_low}, guidance_high={flags.guidance_high}, seed=0)
for image, label in zip(out.images, out.class_labels):
    image.save(f"class-{{label}}.png")
```

`pipe(..., seed=S)` gives the images of `generate.py --global-seed S` with the same settings. For an FID batch
(an ADM `.npz` of 50,000 images, resumable, on all GPUs):

```bash
torchrun --nproc_per_node 8 generate.py --ckpt {ckpt} {sampling}
```
"""


def export(ckpt: str, out_dir: str | os.PathLike, *, use_ema: bool = True, repo_id: str | None = None,
           legacy: bool = False, **card_options) -> Path:
    """Write the Hub folder of a checkpoint (any format generate.py loads) into out_dir; returns out_dir.
    `card_options`: model_card's (fid, fid_samples, sampling, license, dataset, code_url)."""
    from safetensors.torch import save_model

    from reg.loading import load_generator

    model, config, *_ = load_generator(ckpt, use_ema=use_ema, legacy=legacy, decoder=False)
    match = re.search(r"(\d+)\.(pt|safetensors)$", os.path.basename(ckpt))
    out = Path(out_dir)
    full = hub_config(model, config, train_steps=int(match.group(1)) if match else None)
    # what model.save_pretrained writes, each file atomic and with the umask's permissions like every file of
    # ours (the mixin's safetensors file is 0600: colleagues could not read a shared export)
    atomic_write(out / HUB_WEIGHTS, lambda tmp: save_model(model, tmp))
    atomic_json_dump(full, out / HUB_CONFIG)
    card = model_card(model, config=full, repo_id=repo_id, **card_options)
    atomic_write(out / "README.md", card.save)
    return out


def repository_url() -> str | None:
    """The https URL of this checkout's `origin` remote (credentials stripped), for the card's code link."""
    import subprocess
    from urllib.parse import urlsplit, urlunsplit
    try:
        url = subprocess.run(["git", "remote", "get-url", "origin"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if ssh := re.fullmatch(r"[\w.-]+@([\w.-]+):(.+)", url):  # git@github.com:OWNER/NAME.git
        url = f"https://{ssh.group(1)}/{ssh.group(2)}"
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return None
    return urlunsplit(parts._replace(netloc=parts.hostname, path=parts.path.removesuffix(".git")))


def sampling_flags(text: str) -> argparse.Namespace:
    """--sampling as generate.py reads it; a flag it does not take is one UserError (before anything is written)."""
    import contextlib
    import io

    import generate
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return generate.parse_args(shlex.split(text))
    except SystemExit as e:
        reason = said.getvalue().strip().partition("error: ")[2] or said.getvalue().strip()
        raise UserError(f"--sampling {text!r} is not a generate.py command line: {reason}") from e


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("ckpt", help="our .pt or ema_*.safetensors, an official .pt, hf:OWNER/REPO[/FILE], a Hub folder")
    p.add_argument("out_dir", help="folder to write (created; its files are replaced)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="the EMA weights (--no-ema: the raw training weights)")
    p.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA's old decoder_blocks.* checkpoints (as generate.py)")
    p.add_argument("--fid", type=finite_float(0), default=None, help="FID to state on the card")
    p.add_argument("--fid-samples", type=int, default=50_000, help="the number of samples of that FID (50000: FID-50K)")
    p.add_argument("--sampling", type=str, default=None,
                   help=f"generate.py flags of that FID, shown on the card and used by its usage snippet (default: "
                        f"the paper's: {PAPER_SAMPLING})")
    p.add_argument("--license", default="mit", help="the weights' licence on the card (a Hub licence id)")
    p.add_argument("--dataset", default=None,
                   help=f"the training data's Hub dataset id on the card (default: {IMAGENET} for 1000 classes)")
    p.add_argument("--code-url", default=None,
                   help="the code's repository on the card (default: this checkout's git remote `origin`)")
    p.add_argument("--push-to-hub", type=str, default=None, metavar="OWNER/NAME",
                   help="also upload the folder to this Hub repo (needs `hf auth login` or HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = p.parse_args(argv)
    try:
        check_args(args)
    except UserError as e:
        p.error(str(e))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Before anything is loaded or written: the output folder, the card's values, and what an upload needs."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"out_dir {args.out_dir} exists and is not a folder")
    if args.private and not args.push_to_hub:
        raise UserError("--private applies to --push-to-hub: give a repo id too")
    if args.fid_samples < 1:
        raise UserError(f"--fid-samples must be >= 1, got {args.fid_samples}")
    if args.sampling is not None:
        sampling_flags(args.sampling)
    if args.code_url is None:
        args.code_url = repository_url()
    if args.push_to_hub:
        from huggingface_hub import get_token
        if not REPO_ID.fullmatch(args.push_to_hub):
            raise UserError(f"--push-to-hub {args.push_to_hub!r} is not a Hub repo id OWNER/NAME")
        if hub_offline():
            raise UserError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set: export here without it, "
                            "then upload the folder from a machine online with `hf upload OWNER/NAME FOLDER`")
        if get_token() is None:
            raise UserError("--push-to-hub needs a Hugging Face login: run `hf auth login` or set HF_TOKEN")


def main(args: argparse.Namespace) -> Path:
    out = export(args.ckpt, args.out_dir, use_ema=args.ema, fid=args.fid, fid_samples=args.fid_samples,
                 sampling=args.sampling, repo_id=args.push_to_hub, legacy=args.legacy, license=args.license,
                 dataset=args.dataset, code_url=args.code_url)
    print(f"wrote {out}: {', '.join(sorted(f.name for f in out.iterdir()))}; the card links the code at "
          f"{args.code_url or 'no URL (--code-url)'}")
    if args.push_to_hub:
        push(out, args.push_to_hub, private=args.private)
    return out


def push(folder: Path, repo_id: str, *, private: bool) -> str:
    """Create the repo (if needed) and upload the folder; a failure is one line that says the folder is complete."""
    from huggingface_hub import create_repo, upload_folder
    try:
        create_repo(repo_id, private=private, exist_ok=True)
        url = upload_folder(repo_id=repo_id, folder_path=str(folder))
    except Exception as e:  # network, authentication, permissions: the Hub's many error types
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"--push-to-hub {repo_id}: the upload failed ({type(e).__name__}: {first}); {folder} is "
                        f"complete: upload it later with `hf upload {repo_id} {folder}`") from e
    print(f"pushed to {url}")
    return str(url)


if __name__ == "__main__":
    run_main(main, parse_args, user_errors=(CheckpointError,))
