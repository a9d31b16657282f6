"""Pin the torch a cluster already has, so that pip installs our other packages around it (docs/compat.md).

    python -m reg.constraints -o constraints.txt        # e.g. torch==2.4.0, torchvision==0.19.0
    pip install -r requirements.txt -c constraints.txt

Without the constraints, `pip install -r requirements.txt` may replace the installed torch: where torchvision
is missing, pip takes the newest torchvision, which pins the newest torch. With them, pip keeps the installed
torch and torchvision and picks releases of everything else that accept them.

The versions written are those of the installed distributions (their metadata), the ones pip compares:
`torch.__version__` can carry a local label (2.4.0+cu121) that the metadata lacks, and a constraint with it
would match nothing. Only the standard library is used, so this runs before anything else is installed.
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from reg.utils import ArgumentParser, HelpFormatter, UserError, atomic_write_bytes, run_main

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
DEFAULT_PACKAGES = ("torch", "torchvision")
PRE_RELEASE = re.compile(r"(a|b|rc|dev)\d*")


def release(version: str) -> tuple[tuple[int, ...], bool]:
    """(release numbers, is a pre-release) of a PEP 440 version: '2.4.0a0+git' -> ((2, 4, 0), True)."""
    public = version.split("+")[0].lstrip("v")
    numbers = re.match(r"\d+(\.\d+)*", public)
    if numbers is None:
        raise UserError(f"cannot read the version {version!r}")
    rest = public[numbers.end():].lstrip(".-_")
    return tuple(int(n) for n in numbers.group().split(".")), PRE_RELEASE.match(rest) is not None


def lower_bounds(requirements: Path) -> dict[str, str]:
    """{name: X} for each `name>=X` line of a requirements file (names lower-cased, '_' as '-')."""
    bounds = {}
    for line in requirements.read_text().splitlines():
        if match := re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", line):
            bounds[match.group(1).lower().replace("_", "-")] = match.group(2)
    return bounds


def _padded(numbers: tuple[int, ...]) -> tuple[int, ...]:
    return numbers + (0,) * (6 - len(numbers))  # 2.4 == 2.4.0


def constraints(packages: list[str], requirements: Path = REQUIREMENTS) -> tuple[str, list[str]]:
    """(the constraints file's text, warnings). torch must be installed and within requirements.txt's range;
    another package that is missing is left to pip (with a warning)."""
    bounds = lower_bounds(requirements)
    lines = [f"# the packages this Python ({sys.executable}) already has: pip must keep them"]
    warnings = []
    for name in packages:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError as e:
            if name == "torch":
                raise UserError(f"torch is not installed in {sys.executable}: install or load the cluster's torch "
                                f"first (module load, conda activate), or install requirements-lock.txt") from e
            warnings.append(f"{name} is not installed, so pip will choose its release" + (
                "; install it from the index torch came from, so that their CUDA builds match (docs/compat.md)"
                if name == "torchvision" else ""))
            continue
        if bound := bounds.get(name.lower().replace("_", "-")):
            (numbers, pre), (low, _) = release(version), release(bound)
            if _padded(numbers) < _padded(low):
                raise UserError(f"{name} {version} is installed, older than {requirements.name}'s lower bound "
                                f"{name}>={bound}: load a newer {name} (docs/compat.md)")
            if _padded(numbers) == _padded(low) and pre:
                warnings.append(f"{name} {version} is a pre-release build (NGC containers ship these), which pip "
                                f"does not count as >= {bound}: install the rest with `grep -vE "
                                f"'^(torch|torchvision)>=' requirements.txt | pip install -r /dev/stdin -c FILE`")
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n", warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("packages", nargs="*", default=list(DEFAULT_PACKAGES),
                   help="the installed packages to pin")
    p.add_argument("-o", "--output", type=str, default=None,
                   help="file to write, only when every check passed (None: print to stdout)")
    p.add_argument("--requirements", type=Path, default=REQUIREMENTS,
                   help="the ranges the installed versions are checked against")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> str:
    text, warnings = constraints(args.packages, args.requirements)
    for warning in warnings:
        print(f"reg.constraints: warning: {warning}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(text)
    else:
        atomic_write_bytes(args.output, text.encode())
        print(f"wrote {args.output}: {', '.join(line for line in text.splitlines() if not line.startswith('#'))}",
              file=sys.stderr)
    return text


if __name__ == "__main__":
    run_main(main, parse_args)
