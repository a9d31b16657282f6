"""Where weights come from: a local path, or the HF Hub through its cache. The one place that talks to the Hub.

  * `hf:OWNER/REPO[/FILE]`, or a bare repo id OWNER/NAME that names no local path (write ./OWNER/NAME for a
    local folder that does not exist yet); the released REG weights are `hf:Martinser/REG`;
  * a Hub folder (config.json + model.safetensors, written by SiT.save_pretrained or `python -m reg.export`);
  * the cache first, so it works offline; HF_HUB_OFFLINE is read at call time, and a missing file is a clear
    error that says what to fetch.

models/vae.py and models/encoders.py use `hub_offline`; checkpoints record a VAE by `portable_vae_spec`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

OFFICIAL_HUB_REPO = "Martinser/REG"  # the released REG weights
HF_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"  # a Hub folder (huggingface_hub's names)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read at call time (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def portable_vae_spec(spec: str) -> str:
    """The VAE as a checkpoint should record it: a hub id or name as is, a folder never by this machine's
    absolute path. A snapshot in an HF cache becomes its hub id ORG/NAME, another absolute folder its path
    relative to the working directory (where train.py and generate.py are run from)."""
    if not os.path.isabs(spec):
        return spec
    posix = Path(spec).as_posix()
    if match := HF_CACHE_SNAPSHOT.search(posix):
        return f"{match.group(1)}/{match.group(2)}"
    return os.path.relpath(spec)


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


def cached_snapshot(repo: str) -> Path | None:
    """The folder of `repo`'s snapshot in the HF cache, or None; never the network."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id=repo, local_files_only=True))
    except Exception:  # not cached, or not a repo id
        return None


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
