"""What every part of the evaluator shares: its two error types, ADM's feature sizes and npz keys,
progress logging and the default device. Imports nothing from the other evaluations modules."""
from __future__ import annotations

import sys

import torch

from reg.utils import UserError

POOL_DIM = 2048      # pool_3
SPATIAL_DIM = 2023   # mixed_6/conv[..., :7], 17 * 17 * 7
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
STAT_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM),
               "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
FEATURES_KEY = "pool_3"  # per-image pool_3 features, written by --save-stats (precision/recall need them)


class EvalInputError(UserError):
    """An input file that would give wrong numbers: the message names the file and the problem."""


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights are missing or unreadable; the message says what to fetch and where."""


def log(msg: str, verbose: bool = True) -> None:
    """Progress and notices on stderr (stdout carries the metric lines only)."""
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
