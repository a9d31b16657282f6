"""Make the repository root importable from tests (no package install needed)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Never reach for the network in tests: hub look-ups must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
