"""HF hub helpers shared by the encoder, VAE and checkpoint loaders."""
from __future__ import annotations

import os


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read at call time (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
