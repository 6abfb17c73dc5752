"""Everything wgen writes goes through here: the one output-folder policy, atomic writes, sha256.

The policy, the same for every command:

- an output may not be, contain or lie inside any of the command's inputs (zoo, generator, ``--init``,
  dataset files), so no run can delete or change what it reads;
- a missing or empty output folder is started afresh, with a marker file saying wgen wrote it;
- re-running the same command on its own output resumes it: what is done is kept, what is missing is
  made (a finished output is returned as it is); the same output made with other settings is refused;
- anything else in the way is refused unless ``--force``, which replaces only a folder wgen wrote
  (its marker, or a wgen format file from before markers existed), never another folder.

Files and folders are written under a temporary name beside their final one and renamed into place,
so a killed run never leaves a half-written member, report or generator file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import WgenError
from .version import __version__

MARKER = ".wgen"
# What wgen 0.1 wrote, before markers: a folder holding one of these JSON files with a wgen format.
_FORMAT_FILES = ("zoo.json", "canonicalize.json", "config.json", "manifest.json", ".sampling.json")
Chunks = Sequence[bytes | memoryview]


def check_output(out: Path, inputs: Sequence[Path | None], force: bool,
                 resumes: Callable[[Path], bool] = lambda _: False) -> str:
    """Return what to do with output folder ``out``: ``"new"``, ``"resume"`` or ``"replace"`` (``force``).

    ``resumes(out)`` says whether ``out`` is this command's own output with the same settings; it
    may raise a WgenError naming the setting that differs. ``force`` starts over instead of resuming.
    Nothing is changed on disk.
    """
    refuse_overlap(out, inputs)
    if out.exists() and not out.is_dir():
        raise WgenError(f"{out}: exists and is not a folder", "choose another -o")
    if not out.is_dir() or not any(p.name != MARKER for p in out.iterdir()):
        return "new"
    if force:
        if not wgen_wrote(out):
            raise WgenError(f"{out}: exists and was not written by wgen",
                            "--force replaces only folders wgen wrote; choose another -o")
        return "replace"
    if resumes(out):
        return "resume"
    raise WgenError(f"{out}: exists", "choose another -o, or pass --force to replace it")


def start_output(out: Path, kind: str, action: str) -> None:
    """Create output folder ``out`` for ``action`` (from :func:`check_output`), marked as wgen's ``kind``."""
    if action == "replace":
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if action != "resume" or not (out / MARKER).is_file():
        write_marker(out, kind)


def prepare_output(out: Path, kind: str, inputs: Sequence[Path | None], force: bool,
                   resumes: Callable[[Path], bool] = lambda _: False) -> bool:
    """Apply the policy to ``out`` and create it; return True when an earlier run is resumed."""
    action = check_output(out, inputs, force, resumes)
    start_output(out, kind, action)
    return action == "resume"


def write_marker(folder: Path, kind: str) -> None:
    """Write the marker that says wgen wrote ``folder`` (``--force`` replaces only such folders)."""
    atomic_write_json(folder / MARKER, {"kind": kind, "wgen_version": __version__})


def wgen_wrote(folder: Path) -> bool:
    """Return whether ``folder`` carries wgen's marker, or a format file of a wgen from before markers."""
    if (folder / MARKER).is_file():
        return True
    for name in _FORMAT_FILES:
        try:
            value = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(value, dict) and str(value.get("format", "")).startswith("wgen."):
            return True
    return False


def refuse_overlap(out: Path, inputs: Sequence[Path | None]) -> None:
    """Raise a WgenError if output ``out`` is, contains or lies inside any of ``inputs``."""
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise WgenError(f"{out}: the output may not be, contain or lie inside the input {given}",
                            "choose an -o outside every input")


# --------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``final``; rename it to ``final`` on success.

    A run killed inside the block leaves only a dot-folder that readers skip, never a half member;
    an existing ``final`` is moved aside, not deleted, until the new folder is in place.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with _disk_full_is_a_user_error(final):
            yield tmp
        _make_ordinary(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_ordinary(path: Path) -> None:
    # mkstemp, mkdtemp and some writers (safetensors >= 0.8) make private 0600/0700 entries: give the file, or
    # the folder and all below it, the modes a plain open or mkdir would under the umask
    mask = current_umask()
    for entry in [path, *(path.rglob("*") if path.is_dir() else ())]:
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; rename it to ``path`` on success (ordinary permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        with _disk_full_is_a_user_error(path):
            yield Path(tmp)
        _make_ordinary(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as pretty JSON to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")


def write_folder(path: Path, files: dict[str, Chunks]) -> dict[str, str]:
    """Write a folder atomically at ``path``, each file given as the chunks of its bytes.

    Returns the sha256 of each file, hashed from the chunks as they were written.
    """
    digests = {}
    with atomic_dir(path) as tmp:
        for name, chunks in files.items():
            # hashing and writing both release the GIL: hash on a helper thread while the bytes are written
            digest = _hasher().submit(sha256_chunks, chunks)
            with open(tmp / name, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
            digests[name] = digest.result()
    return digests


@contextlib.contextmanager
def _disk_full_is_a_user_error(path: Path) -> Iterator[None]:
    """Turn a write that ran out of disk space (an OSError, or safetensors' own error) into a WgenError."""
    try:
        yield
    except Exception as exc:
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (full or "No space left on device" in str(exc)):
            raise
        raise WgenError(f"{path}: no space left on the device",
                        "free some space, then re-run the same command: what was written is kept") from exc


def current_umask() -> int:
    """Return the process umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------
# sha256


def sha256_chunks(chunks: Chunks) -> str:
    """Return the hex sha256 of the concatenated ``chunks``."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """Return the hex sha256 of the file at ``path``, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _hasher() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wgen-sha256")
