"""ADM's Inception-v3 (TF graph of 2015-12-05) in PyTorch: torch-fidelity's `FeatureExtractorInceptionV3`,
an exact port of that graph (TF1 bilinear resize to 299, (x - 128) / 128, the same weights), with a hook
for the sFID features (docs/design.md#evaluation). Also: where the weights come from, their identity
(sha256) for cached statistics, and seeded random weights for smoke tests."""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch_fidelity.feature_extractor_inceptionv3 as tfi

from evaluations.common import SPATIAL_DIM, InceptionWeightsError, log
from reg.utils import fp32_precision

INCEPTION_URL = tfi.URL_INCEPTION_V3
INCEPTION_FILENAME = INCEPTION_URL.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
WEIGHTS_ENV = "REG_INCEPTION_WEIGHTS"


class _InceptionLayers(nn.Module):
    """The parameterised layers of torch-fidelity 0.4.0's FeatureExtractorInceptionV3, same names and
    order: only used to make a seeded random state dict. A drift from torch-fidelity's own list
    fails its strict load_state_dict, loudly."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = tfi.BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = tfi.BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = tfi.BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = tfi.BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = tfi.BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = tfi.InceptionA(192, pool_features=32)
        self.Mixed_5c = tfi.InceptionA(256, pool_features=64)
        self.Mixed_5d = tfi.InceptionA(288, pool_features=64)
        self.Mixed_6a = tfi.InceptionB(288)
        self.Mixed_6b = tfi.InceptionC(768, channels_7x7=128)
        self.Mixed_6c = tfi.InceptionC(768, channels_7x7=160)
        self.Mixed_6d = tfi.InceptionC(768, channels_7x7=160)
        self.Mixed_6e = tfi.InceptionC(768, channels_7x7=192)
        self.Mixed_7a = tfi.InceptionD(768)
        self.Mixed_7b = tfi.InceptionE_1(1280)
        self.Mixed_7c = tfi.InceptionE_2(2048)
        self.fc = nn.Linear(2048, 1008)


def _random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded so that two runs (e.g. --save-stats, then evaluation) see the same random network;
    fan-in normal init keeps activations O(1) through the 90+ conv layers."""
    net = _InceptionLayers()
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5, generator=g)
            nn.init.normal_(m.bias, generator=g)  # non-zero, so biased and unbiased logits differ
    return net.state_dict()


def _torch_fidelity_inception(state: dict[str, torch.Tensor]) -> tfi.FeatureExtractorInceptionV3:
    """torch-fidelity's network built through its own constructor argument
    `feature_extractor_weights_path`, which it reads with torch.load(weights_only=False). We never
    hand it a user's file: it gets an in-memory copy of a state dict that we loaded with
    weights_only=True (plain tensors, so unpickling it runs no code)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return tfi.FeatureExtractorInceptionV3("inception-v3-adm", ["2048", "logits_unbiased"],
                                           feature_extractor_weights_path=buf)


def default_weights_path() -> str:
    """Where torch-fidelity's own download lands: <torch hub dir>/checkpoints/<file name>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILENAME)


def _weights_help(path: str) -> str:
    return (f"Fetch {INCEPTION_FILENAME} from\n  {INCEPTION_URL}\non a machine with internet access and "
            f"either put it at\n  {path}\n(torch-fidelity's torch-hub checkpoints dir; set TORCH_HOME to "
            f"move it) or pass --inception-weights /path/to/{INCEPTION_FILENAME} (or set {WEIGHTS_ENV}).")


def resolve_weights(spec: Optional[str]) -> Optional[str]:
    """--inception-weights beats $REG_INCEPTION_WEIGHTS beats torch-fidelity's default location."""
    if spec:
        return spec
    return os.environ.get(WEIGHTS_ENV) or None


def _load_error_text(e: BaseException) -> str:
    """torch.load's message, minus its advice to retry with weights_only=False (we never do)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    return text[text.index(marker):].strip() if marker in text else text


def _load_state_dict(spec: Optional[str], verbose: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, identity): the identity is "random" or the sha256 of the weights file, so cached
    statistics can tell which network made them whatever the file is called."""
    if spec == "random":
        return _random_state_dict(), "random"
    if spec is not None:
        path = os.path.expanduser(spec)
        if not os.path.isfile(path):
            raise InceptionWeightsError(f"Inception weights file {path} does not exist.\n"
                                        + _weights_help(default_weights_path()))
    else:
        path = default_weights_path()
        if not os.path.isfile(path):
            log(f"downloading {INCEPTION_URL} to {path}", verbose)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, path, progress=verbose)
            except Exception as e:  # URLError, HTTPError, timeouts, SSL, disk: all mean "not there"
                raise InceptionWeightsError(
                    f"Inception weights are not at {path} and downloading them failed "
                    f"({type(e).__name__}: {e}).\n" + _weights_help(path)) from e
    try:
        with open(path, "rb") as f:
            data = f.read()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionWeightsError(f"cannot read Inception weights {path} ({type(e).__name__}: "
                                    f"{_load_error_text(e)}).\n" + _weights_help(default_weights_path())) from e
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{path} holds a {type(state).__name__}, not an Inception-v3 state dict.\n"
                                    + _weights_help(default_weights_path()))
    return state, "sha256:" + hashlib.sha256(data).hexdigest()


class InceptionV3(nn.Module):
    """pool_3 (2048), spatial (2023, channels-last) and logits (1008, no bias) for uint8 NCHW images."""

    def __init__(self, net: tfi.FeatureExtractorInceptionV3, random_weights: bool, weights: str,
                 weights_id: str = "unknown"):
        super().__init__()
        self.net, self.random_weights, self.weights = net, random_weights, weights
        self.weights_id = weights_id  # "random" or "sha256:<hex>" of the weights file
        self._spatial: Optional[torch.Tensor] = None
        # mixed_6/conv:0 in the TF graph is the ReLU output of Mixed_6d's 1x1 branch.
        net.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    def _grab_spatial(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._spatial = output

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pool, logits = self.net(images)
        spatial, self._spatial = self._spatial, None
        if spatial is None or tuple(spatial.shape[1:]) != (192, 17, 17):
            raise RuntimeError(f"Mixed_6d.branch1x1 hook gave {None if spatial is None else spatial.shape}, "
                               "expected (N, 192, 17, 17)")
        # TF tensors are NHWC: ADM's spatial[..., :7] then reshape(N, -1) flattens (h, w, c).
        spatial = spatial[:, :7].permute(0, 2, 3, 1).reshape(len(spatial), SPATIAL_DIM)
        return pool, spatial.float(), logits

    @torch.no_grad()
    def logits_from_pool(self, pool: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """pool_3 @ W (no bias), the same product as torch-fidelity's 'logits_unbiased' output."""
        w = self.net.fc.weight
        with fp32_precision("ieee"):
            out = [(torch.as_tensor(pool[i:i + batch_size], device=w.device) @ w.T).cpu().numpy()
                   for i in range(0, len(pool), batch_size)]
        return np.concatenate(out).astype(np.float32)


def build_inception(weights: Optional[str] = None, device: torch.device | str = "cpu",
                    verbose: bool = True) -> InceptionV3:
    """Inception-v3 2015-12-05. `weights`: None (torch-fidelity's default file, downloaded if
    missing), a local .pth path, or "random" (smoke tests only: the numbers mean nothing)."""
    state, weights_id = _load_state_dict(weights, verbose)
    random_weights = weights_id == "random"
    if random_weights:
        banner = "!" * 78
        msg = ("USING RANDOM INCEPTION WEIGHTS: FID/sFID/IS/precision/recall below are MEANINGLESS "
               "(smoke test only)")
        log(f"{banner}\n{msg}\n{banner}")
        warnings.warn(msg)
    try:
        net = _torch_fidelity_inception(state)
    except RuntimeError as e:  # wrong keys/shapes: not the Inception-2015 weights
        detail = str(e) if len(str(e)) < 300 else str(e)[:300] + " ..."  # the key lists run long
        raise InceptionWeightsError(f"{weights or default_weights_path()} does not hold the expected Inception-v3 "
                                    f"weights ({detail}).\n" + _weights_help(default_weights_path())) from e
    label = "random" if random_weights else (weights or default_weights_path())
    return InceptionV3(net, random_weights=random_weights, weights=label, weights_id=weights_id).to(device).eval()
