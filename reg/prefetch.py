"""Fetch everything a configuration needs into the caches the code reads, on a machine with network access (a
login node); compute nodes then run with HF_HUB_OFFLINE=1 (docs/cluster.md#offline-compute-nodes).

    python -m reg.prefetch --enc-type dinov2-vit-b --vae ema --inception --ref-batch 256 --ckpt hf:Martinser/REG

Each item is fetched by the loader the commands use, then loaded again by that loader with HF_HUB_OFFLINE=1,
as a compute node will: where prefetch puts a file and where the code looks are one and the same code.

  --vae        SD-VAE(s) through diffusers into the HF cache         models.vae.load_vae
  --enc-type   the torch.hub file if there, else timm's weights      models.encoders.load_encoder
               on the HF Hub into the HF cache
  --inception  torch-fidelity's Inception-2015 file, in torch.hub's  evaluations.inception.build_inception
               checkpoints folder
  --ckpt       hf:OWNER/NAME[/FILE] into the HF cache                reg.hub.resolve_checkpoint
  --ref-batch  ADM's reference batch, into --ref-dir (eval.sh's REF_BATCH default is the working directory)

HF_HOME (or HF_HUB_CACHE) and TORCH_HOME choose the caches: give compute nodes the same values.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from reg.hub import cached_snapshot, resolve_checkpoint
from reg.utils import ArgumentParser, HelpFormatter, UserError, run_main

ADM_REF_BATCHES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
REF_BATCH_FILES = {256: "VIRTUAL_imagenet256_labeled.npz", 512: "VIRTUAL_imagenet512.npz"}  # ADM's names


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the loaders (they read it at call time), as on a compute node."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def fetch(what: str, load: Callable[[], str]) -> tuple[str, str]:
    """(where, 'cached' or 'fetched'): `load` is the loader as the commands call it, returning where it found
    the item. Tried offline first; else run online (it downloads into its cache), then offline again."""
    try:
        with offline():
            return load(), "cached"
    except (FileNotFoundError, ValueError):  # the loaders' "not in the cache" (WeightsNotFoundError and friends)
        pass
    try:
        load()
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{what}: could not fetch it: {e}") from e
    try:
        with offline():
            return load(), "fetched"
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{what}: fetched, but not found with HF_HUB_OFFLINE=1 (a compute node would fail): {e}") from e


def load_vae_from_cache(spec: str) -> str:
    from models.vae import load_vae
    name = load_vae(spec).name  # a hub id, or a local folder as it was given
    if "/" not in name or os.path.isdir(name):
        return name
    return str(cached_snapshot("/".join(name.split("/")[:2])) or name)


def load_encoder_from_cache(name: str) -> str:
    from models.encoders import load_encoder, local_weights
    load_encoder(name)
    return str(local_weights(name))


def fetch_inception() -> tuple[str, str]:
    """The evaluator's weights file (REG_INCEPTION_WEIGHTS, else torch-fidelity's place in the torch.hub
    folder, downloaded there when missing), checked by building the network from it."""
    from evaluations.inception import build_inception, default_weights_path, resolve_weights
    path = resolve_weights(None) or default_weights_path()
    state = "cached" if os.path.isfile(path) else "fetched"
    try:
        build_inception(resolve_weights(None), verbose=False)
    except FileNotFoundError as e:  # InceptionWeightsError: not there, not downloadable, or not these weights
        raise UserError(f"--inception: {e}") from e
    return path, state


def fetch_ref_batch(resolution: int, folder: Path) -> tuple[str, str]:
    """ADM's reference batch into folder, checked: an npz of uint8 (N, R, R, 3) images, every member's CRC."""
    import torch

    from evaluations.npz import inspect_batch
    path = folder / REF_BATCH_FILES[resolution]
    state = "cached"
    if not path.is_file():
        url = f"{ADM_REF_BATCHES}/{resolution}/{path.name}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=True)  # to a temporary file, then renamed
        except Exception as e:  # URLError, HTTPError, timeouts, a full disk: the file is not there
            raise UserError(f"--ref-batch {resolution}: downloading {url} failed ({type(e).__name__}: {e})") from e
        state = "fetched"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        info = inspect_batch(str(path))
    except (zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"--ref-batch {resolution}: {path} is not a readable npz ({e}); delete it and rerun") from e
    if bad is not None or info.image_shape != (resolution, resolution, 3):
        raise UserError(f"--ref-batch {resolution}: {path} holds " + (f"a corrupt member {bad}" if bad else
                        f"images of shape {info.image_shape}, not ({resolution}, {resolution}, 3)")
                        + "; delete it and rerun")
    return str(path), state


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--enc-type", type=str, default=None, help="encoders, comma-separated, as train.py's --enc-type")
    p.add_argument("--vae", type=str, default=None,
                   help="VAEs, comma-separated: ema, mse or a hub id ORG/NAME[/SUBFOLDER] (None: no VAE)")
    p.add_argument("--inception", action="store_true", help="the Inception-2015 weights of the evaluator")
    p.add_argument("--ref-batch", type=int, nargs="*", default=[], choices=sorted(REF_BATCH_FILES),
                   help="ADM reference batches, by resolution")
    p.add_argument("--ref-dir", type=Path, default=Path("."), help="where the reference batches go")
    p.add_argument("--ckpt", type=str, nargs="*", default=[], help="checkpoints hf:OWNER/NAME[/FILE] (or OWNER/NAME)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Fetches every item asked for; returns and prints (item, where, 'cached' / 'fetched') for each."""
    from models.encoders import parse_enc_type

    encoders = parse_enc_type(args.enc_type) if args.enc_type else []  # every flag checked before any download
    vaes = [v.strip() for v in (args.vae or "").split(",") if v.strip()]
    if not (encoders or vaes or args.inception or args.ref_batch or args.ckpt):
        raise UserError("nothing to fetch: name at least one of --enc-type, --vae, --inception, --ref-batch, --ckpt")
    done = []
    for spec in vaes:
        done.append((f"--vae {spec}", *fetch(f"--vae {spec}", lambda s=spec: load_vae_from_cache(s))))
    for name in encoders:
        done.append((f"--enc-type {name}", *fetch(f"--enc-type {name}", lambda n=name: load_encoder_from_cache(n))))
    if args.inception:
        done.append(("--inception", *fetch_inception()))
    for resolution in args.ref_batch:
        done.append((f"--ref-batch {resolution}", *fetch_ref_batch(resolution, args.ref_dir)))
    for spec in args.ckpt:
        done.append((f"--ckpt {spec}", *fetch(f"--ckpt {spec}", lambda s=spec: str(resolve_checkpoint(s)))))
    for item, where, state in done:
        print(f"{item:28s} {state:8s} {where}")
    print("every item above loads with HF_HUB_OFFLINE=1; give compute nodes the same HF_HOME and TORCH_HOME")
    return done


if __name__ == "__main__":
    run_main(main, parse_args)
