"""The documentation names only files and modules that exist.

README.md, docs/*.md and benchmarks/RESULTS.md are read line by line (code blocks included: their commands
are what a reader copies). Each line is checked for these kinds of reference:

1. markdown links `[text](target)`, relative to the document's folder, with `#anchor` checked against the
   headings of the target (GitHub's anchor rule); web links are out of scope;
2. paths whose first component is a top-level entry of the repository (`reg/loading.py`, `tests/test_x.py`,
   `docs/x.md#anchor`, `slurm/`, `.ci/old_torch.sh`, globs like `tests/test_*.py`), relative to the root;
3. bare file names of code (`image_sampling.py`, `cluster.py`, `train.sh`, `train.sbatch`): some file of the
   repository must have that name;
4. dotted names whose first component is one of our top-level modules or packages (`reg.loading.load_generator`,
   `models.vae.load_vae`, `python -m reg.export`) or a module this repository used to have (FORMER_MODULES:
   `checkpoint_io.CheckpointDir`, `utils.atomic_write`): the module is imported from this repository and the
   rest resolved with getattr. `python -m X` must name a module. Names of other packages (torch.*, np.*,
   timm.*, diffusers.*, accelerate.*, huggingface_hub.*, wandb) never match, so they are out of scope;
5. the former modules' names themselves: one with an underscore (`train_eval`, `image_sampling`) anywhere as a
   word, any of them as a whole code span (`` `training` ``);
6. `python reg/x.py`: the modules of the package import it, so they only run as `python -m reg.x`.

The authors' files: REG's, REPA's and EDM2's code has files we do not have (their `models/clip_vit.py`, EDM2's
`dataset_tool.py`). Such a name is accepted only when it is in AUTHORS_FILES and its line says whose it is
(OWNER_MARKER: "the authors'", "their", "REG's", "REPA's", "the original", or the project's name right before
it, as in "REG `utils.py`"). Anything else that does not exist fails, naming the document, the line and the
name. Test names (`test_resume_is_exact`) are not checked.
"""
from __future__ import annotations

import fnmatch
import functools
import importlib
import inspect
import os
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
        "benchmarks/RESULTS.md"]

# Modules this repository had before they moved into reg/ (or were split): a dotted name or code span that
# starts with one of them is stale. The names with an underscore cannot be English words, so they are
# flagged wherever they stand as a word.
FORMER_MODULES = {
    "cluster", "checkpoint_io", "image_sampling", "train_loop", "launch_settings", "run_flags", "metrics_log",
    "sample_grid", "utils", "interpolant", "train_eval", "training", "generation",
}
# The authors' files that this repository does not have (REG, REPA, EDM2's dataset tool), by the names the
# docs use for them. Accepted only on a line that says they are theirs.
AUTHORS_FILES = {
    "models/clip_vit.py", "clip_vit.py", "models/mocov3_vit.py", "models/mae_vit.py", "models/jepa.py",
    "preprocessing/encoders.py", "preprocessing/dataset_image_encoder.py", "dataset_tool.py",
    "train_t2i.py", "generate_t2i.py", "samplers_t2i.py",
}
OWNER_MARKER = re.compile(r"\bauthors'|\btheirs?\b|\b(?:REG|REPA|EDM2|ADM|SiT|DiT)'s\b|\bthe original\b")
OWNER_PREFIX = re.compile(r"\b(?:REG|REPA|EDM2|ADM)\s+`?$")
# The last component of a dotted name that is a file extension: `dataset.json` is a file name, not a module.
FILE_EXTS = {"py", "md", "sh", "sbatch", "txt", "json", "jsonl", "npz", "npy", "png", "pt", "pth", "safetensors",
             "zip", "yaml", "yml", "cff", "ini", "csv", "log", "tar", "gz"}

LINK = re.compile(r"(?<![\w\])])!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PATH = re.compile(r"(?<![\w$~:@/.-])((?:\./)?\.?[\w-]+/[\w./*#-]*)")
BARE_FILE = re.compile(r"(?<![\w/.$~-])([\w-]+\.(?:py|sh|sbatch))(?![\w/-])")
DOTTED = re.compile(r"(?<![\w./:@$-])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)")
RUN_MODULE = re.compile(r"\bpython3?\s+-m\s+([\w.]+)")
RUN_SCRIPT = re.compile(r"\bpython3?\s+(?:\./)?(reg/[\w/]+\.py)")
CODE_SPAN = re.compile(r"`([^`]+)`")
FORMER_WORD = re.compile(r"(?<![.\w])(" + "|".join(sorted(n for n in FORMER_MODULES if "_" in n)) + r")\b(?!\.\w)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")

@functools.lru_cache(maxsize=None)
def repo_files() -> frozenset[str]:
    """The repository's files (tracked, and new ones git does not ignore), as root-relative posix paths."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        files = {f for f in out.split("\0") if f and (ROOT / f).exists()}
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but caches
        files = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                 if p.is_file() and not {".git", "__pycache__"} & set(p.relative_to(ROOT).parts)}
    return frozenset(files)


@functools.lru_cache(maxsize=None)
def repo_dirs() -> frozenset[str]:
    return frozenset(str(parent) for f in repo_files() for parent in PurePosixPath(f).parents if str(parent) != ".")


@functools.lru_cache(maxsize=None)
def top_level() -> frozenset[str]:
    return frozenset(f.split("/")[0] for f in repo_files())


@functools.lru_cache(maxsize=None)
def basenames() -> frozenset[str]:
    return frozenset(PurePosixPath(f).name for f in repo_files())


@functools.lru_cache(maxsize=None)
def our_modules() -> frozenset[str]:
    """Top-level modules and packages of this repository: what a dotted name may start with."""
    files = repo_files()
    return frozenset({f[:-3] for f in files if "/" not in f and f.endswith(".py")}
                     | {f.split("/")[0] for f in files if f.count("/") == 1 and f.endswith("/__init__.py")})


def module_file(name: str) -> str | None:
    """The repository file of module `name`, or None when the repository has no such module."""
    rel = name.replace(".", "/")
    for candidate in (rel + ".py", rel + "/__init__.py"):
        if candidate in repo_files():
            return candidate
    return None


def exists(path: str) -> bool:
    path = path.rstrip("/")
    if any(c in path for c in "*?["):
        return any(fnmatch.fnmatch(f, path) for f in repo_files())
    return path in repo_files() or path in repo_dirs()


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces
    to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(doc: str) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in (ROOT / doc).read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        m = None if fenced else HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def check_anchor(doc: str, anchor: str) -> str | None:
    if not doc.endswith(".md") or not anchor:
        return None
    if anchor not in anchors(doc):
        return f"{doc} has no heading with the anchor #{anchor}"
    return None


def class_members(cls: type) -> set[str]:
    """Attributes an instance of `cls` has besides the class's own: dataclass / NamedTuple fields and
    annotations, and `self.X = ...` in its methods."""
    names = set()
    for klass in inspect.getmro(cls):
        names |= set(getattr(klass, "__annotations__", {}))
        try:
            names |= set(re.findall(r"self\.(\w+)\s*(?::[^=\n]*)?=", inspect.getsource(klass)))
        except (OSError, TypeError):
            pass
    return names


@functools.lru_cache(maxsize=None)
def resolve(dotted: str, must_be_module: bool = False) -> str | None:
    """None if `dotted` names a module of this repository or something in one; otherwise why not."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        file = module_file(name)
        if file is None:
            continue
        if must_be_module and i < len(parts):
            return f"{'.'.join(parts[:i + 1])} is not a module of this repository"
        module = importlib.import_module(name)
        if Path(module.__file__).resolve() != (ROOT / file).resolve():  # e.g. a `utils` from site-packages
            return f"{name} imports from {module.__file__}, not from this repository's {file}"
        obj = module
        for j in range(i, len(parts)):
            attr = parts[j]
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
            elif inspect.isclass(obj) and attr in class_members(obj) and j == len(parts) - 1:
                return None
            else:
                return f"{'.'.join(parts[:j])} has no attribute {attr}"
        return None
    if parts[0] in FORMER_MODULES:
        return f"{parts[0]} is no longer a module of this repository (see reg/__init__.py for where it went)"
    return f"no module {parts[0]} in this repository"


def owned_by_authors(name: str, line: str, start: int) -> bool:
    return name in AUTHORS_FILES and bool(OWNER_MARKER.search(line) or OWNER_PREFIX.search(line[:start]))


def line_problems(doc: str, line: str) -> list[str]:
    """What `line` of `doc` names that does not exist, each as `name: why`."""
    problems: dict[str, str] = {}

    def flag(name: str, why: str, start: int) -> None:
        if not owned_by_authors(name, line, start):
            problems.setdefault(name, why)

    doc_dir = PurePosixPath(doc).parent
    for m in LINK.finditer(CODE_SPAN.sub(lambda c: " " * len(c.group(0)), line)):  # no links in code
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        if not path:
            why = check_anchor(doc, anchor)
        else:
            resolved = os.path.normpath((doc_dir / path).as_posix())
            if resolved.startswith(".."):
                why = f"the link leaves the repository"
            elif not exists(resolved):
                why = f"no file {resolved} (the link is relative to {doc_dir.as_posix() or 'the root'}/)"
            else:
                why = check_anchor(resolved, anchor)
        if why:
            flag(target, why, m.start())
    for m in PATH.finditer(line):
        token = m.group(1).rstrip(".,;")
        token = token[2:] if token.startswith("./") else token
        path, _, anchor = token.partition("#")
        if path.split("/")[0] not in top_level():
            continue
        if not exists(path):
            flag(path, "no such file or folder in the repository", m.start())
        elif anchor and (why := check_anchor(path, anchor)):
            flag(token, why, m.start())
    for m in BARE_FILE.finditer(line):
        if m.group(1) not in basenames():
            flag(m.group(1), "no file of that name in the repository", m.start())
    for m in RUN_SCRIPT.finditer(line):
        module = m.group(1)[:-3].replace("/", ".")
        flag(m.group(1), f"reg/ modules import the package: run it as python -m {module}", m.start(1))
    run_modules = {m.group(1) for m in RUN_MODULE.finditer(line)}
    for name in run_modules:
        if name.split(".")[0] in our_modules() | FORMER_MODULES and (why := resolve(name, must_be_module=True)):
            flag(name, why, line.find(name))
    for m in DOTTED.finditer(line):
        name = m.group(1)
        first, last = name.split(".")[0], name.split(".")[-1]
        if name in run_modules or last in FILE_EXTS or first not in our_modules() | FORMER_MODULES:
            continue
        if why := resolve(name):
            flag(name, why, m.start())
    for m in FORMER_WORD.finditer(line):
        flag(m.group(1), "a module this repository no longer has (see reg/__init__.py)", m.start())
    for m in CODE_SPAN.finditer(line):
        if m.group(1) in FORMER_MODULES:
            flag(m.group(1), "a module this repository no longer has (see reg/__init__.py)", m.start())
    return [f"`{name}`: {why}" for name, why in problems.items()]


def doc_problems(doc: str, text: str | None = None) -> list[str]:
    """The problems of `doc`, as `doc:line: name: why`."""
    text = (ROOT / doc).read_text(encoding="utf-8") if text is None else text
    return [f"{doc}:{number}: {problem}" for number, line in enumerate(text.splitlines(), 1)
            for problem in line_problems(doc, line)]


@pytest.mark.parametrize("doc", DOCS)
def test_doc_names_only_what_exists(doc):
    found = doc_problems(doc)
    assert not found, f"{doc} names what does not exist:\n" + "\n".join(found)


def test_the_checker_catches_each_kind_of_stale_name():
    text = "\n".join([
        "See `reg/nothere.py`, [the guide](nothere.md) and [design](design.md#no-such-heading).",  # 1
        "`image_sampling.py` draws the images; `cluster.py` holds the lock.",  # 2
        "Load with `reg.loading.load_generatorr` or `checkpoint_io.CheckpointDir`; `models.hub.export`.",  # 3
        "Run `python -m reg.exports CKPT OUT` or `python reg/resume_flags.py`.",  # 4
        "FID during training is cached by train_eval, see `training`.",  # 5
        "The `tests/test_nothere.py` test and `slurm/nothere.sbatch`.",  # 6
        "Our `models/clip_vit.py` wraps CLIP.",  # 7: not theirs, so not excused
    ])
    found = doc_problems("docs/example.md", text)
    names = sorted(p.split(": ")[1] for p in found)
    assert names == sorted(["`reg/nothere.py`", "`nothere.md`", "`design.md#no-such-heading`",
                            "`image_sampling.py`", "`cluster.py`",
                            "`reg.loading.load_generatorr`", "`checkpoint_io.CheckpointDir`", "`models.hub.export`",
                            "`reg/resume_flags.py`", "`reg.exports`",
                            "`train_eval`", "`training`",
                            "`tests/test_nothere.py`", "`slurm/nothere.sbatch`",
                            "`models/clip_vit.py`"]), found
    assert "docs/example.md:1: `reg/nothere.py`: no such file or folder in the repository" in found


def test_the_checker_accepts_what_exists_and_what_is_not_ours():
    text = "\n".join([
        "`reg.loading.load_generator`, `models.vae.load_vae`, `python -m reg.export`, `reg/loading.py`,",
        "[compat](compat.md#supported-versions), `docs/design.md#data-flow`, `tests/test_*.py`, `slurm/`,",
        "`reg.checkpoints.CheckpointDir.save`, `dataset.json`, `loss.py`, `samplers.euler_maruyama_sampler`,",
        "torch.compile, `torch.utils.flop_counter.FlopCounterMode`, np.cov, timm.layers, wandb, `hf:Martinser/REG`,",
        "`accelerate.commands.launch`, `huggingface_hub.PyTorchModelHubMixin`, `DATA/vae-sd/dataset.json`,",
        "REPA's CLIP wrapper (`models/clip_vit.py`), EDM2's `dataset_tool.py`, REG `utils.py` `load_encoders`,",
        "`test_resume_is_exact`, `tests/test_speed.py::test_split_attention_equals_plain_in_fp64`.",
    ])
    found = doc_problems("docs/example.md", text)
    assert not found, found
