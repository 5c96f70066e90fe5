"""An index directory on disk as generations: every build writes a complete new set of files, then switches to it.

    IDX/CURRENT            the name of the live generation (one line), replaced with one atomic `os.replace`
    IDX/gen-000003/        the files of one build (index.faiss, objects.parquet, meta.json, map.npy, ...)
    IDX/gen-000003/MANIFEST.json
                           every file of the generation with its size and SHA-256, and the generation's own name
    IDX/marks.*, ...       files the user or the web explorer keeps beside the index: never touched by a rebuild

A build writes `gen-<n+1>/` beside the live generation, finishes it with its manifest, and only then points
`CURRENT` at it; the older generations are pruned afterwards. A build killed at any moment therefore leaves either
the old generation live (with a half-written directory nobody reads, removed by the next build) or the new one
complete. Readers resolve `CURRENT` once and open every file from that one directory, after checking it against
its manifest (names and sizes; `verify_generation(..., hashes=True)` also re-hashes), so they never see a mix.
Open files stay readable when a later build prunes their generation (POSIX keeps unlinked files alive), which is
why `SearchIndex` maps its arrays when it opens.

`ASTROLOM_INDEX_FAULT=N` (tests only) kills the building process with SIGKILL at its N-th file boundary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

CURRENT = "CURRENT"
MANIFEST = "MANIFEST.json"
GEN_RE = re.compile(r"^gen-(\d{6})$")
FAULT_ENV = "ASTROLOM_INDEX_FAULT"
# files a pre-generation astrolom wrote straight into IDX: removed once a generation replaces them
LEGACY = ("index.faiss", "objects.parquet", "meta.json", "map.npy")
LEGACY_GLOBS = ("outliers-k*.npy", "index-*.faiss", "rows-*.npy", "*.faiss.tmp")

_boundaries = 0


def boundary(what: str) -> None:
    """Mark a file boundary of a build; under `ASTROLOM_INDEX_FAULT=N` the N-th one kills the process (SIGKILL),
    so tests can check that a build killed anywhere leaves a readable index."""
    global _boundaries
    target = os.environ.get(FAULT_ENV)
    if not target:
        return
    _boundaries += 1
    if _boundaries == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def _generations(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    gens = [(int(m.group(1)), p) for p in root.iterdir() if (m := GEN_RE.match(p.name)) and p.is_dir()]
    return sorted(gens)


def current_generation(root: str | Path) -> Path:
    """The live generation directory of index `root`, or a FileNotFoundError that says what is there instead."""
    root = Path(root)
    pointer = root / CURRENT
    if not pointer.is_file():
        if (root / "index.faiss").is_file():
            raise FileNotFoundError(
                f"{root} is an index written by an older astrolom (files straight in the directory, no {CURRENT}); "
                "rebuild it with `astrolom index`"
            )
        raise FileNotFoundError(f"{root} is not an astrolom index (no {CURRENT} file); build one with `astrolom index`")
    name = pointer.read_text().strip()
    if not GEN_RE.match(name):
        raise ValueError(f"{pointer}: names {name!r}, not a generation (gen-NNNNNN)")
    gen = root / name
    if not gen.is_dir():
        raise FileNotFoundError(f"{pointer} names {name}, which is not there: the index directory was damaged")
    return gen


def new_generation(root: str | Path) -> Path:
    """Create and return the next (empty) generation directory of `root`, after removing unfinished ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    live = _live_name(root)
    gens = _generations(root)
    for _, p in gens:  # left by a killed build: never live, never read
        if p.name != live and not (p / MANIFEST).is_file():
            shutil.rmtree(p, ignore_errors=True)
    gen = root / f"gen-{(gens[-1][0] + 1 if gens else 1):06d}"
    gen.mkdir()
    return gen


def _live_name(root: Path) -> str | None:
    try:
        return (root / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def commit_generation(gen: Path) -> Path:
    """Seal `gen` with its manifest, make it the live generation with one atomic rename, prune the others.

    Every file in `gen` is flushed to disk before the switch, so a crash after it cannot expose a file that is
    named by the manifest but not yet written."""
    root = gen.parent
    files = {}
    for p in sorted(gen.iterdir()):
        if p.name == MANIFEST or not p.is_file():
            continue
        _fsync(p)
        files[p.name] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
    _write_atomic(gen / MANIFEST, json.dumps({"generation": gen.name, "files": files}, indent=1))
    boundary("manifest")
    _write_atomic(root / CURRENT, gen.name + "\n")
    boundary("switch")
    prune(root)
    return gen


def prune(root: Path) -> None:
    """Remove every generation but the live one, and the files of a pre-generation index; leave all else."""
    live = _live_name(root)
    for _, p in _generations(root):
        if p.name != live:
            shutil.rmtree(p, ignore_errors=True)
    for name in LEGACY:
        (root / name).unlink(missing_ok=True)
    for pattern in LEGACY_GLOBS:
        for p in root.glob(pattern):
            p.unlink(missing_ok=True)


def verify_generation(gen: Path, *, hashes: bool = False) -> dict:
    """The manifest of `gen` after checking it names this generation and matches its files (sizes, and with
    `hashes` the SHA-256); a ValueError naming the file otherwise."""
    f = gen / MANIFEST
    if not f.is_file():
        raise ValueError(f"{gen}: no {MANIFEST}; the generation was never finished, rebuild the index")
    try:
        manifest = json.loads(f.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{f}: not a valid manifest ({err})") from err
    if manifest.get("generation") != gen.name:
        raise ValueError(f"{f}: describes generation {manifest.get('generation')!r}, not {gen.name}")
    for name, entry in files.items():
        p = gen / name
        if not p.is_file():
            raise ValueError(f"{gen}: {name} is named by the manifest but missing; rebuild the index")
        if p.stat().st_size != entry["bytes"]:
            raise ValueError(
                f"{p}: {p.stat().st_size} bytes, but the manifest says {entry['bytes']}: the file was changed "
                "after the index was built; rebuild the index"
            )
        if hashes and file_digest(p) != entry["sha256"]:
            raise ValueError(f"{p}: its SHA-256 differs from the manifest's; rebuild the index")
    extra = sorted(p.name for p in gen.iterdir() if p.is_file() and p.name != MANIFEST and p.name not in files)
    if extra:
        raise ValueError(f"{gen}: files not in the manifest ({', '.join(extra)}); rebuild the index")
    return manifest


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
