"""Stage 8 — put the artifact in place: built in its own staging directory beside the target, renamed in at the end.

    write_artifact(out, write, finish=selftest)   # write(tmp) writes every file; finish(tmp) checks the whole thing

The rules, so that nothing a user made is ever deleted or overwritten and no half-built artifact looks whole:
- kiln writes `out` only when it is absent, an empty directory, or a directory kiln made: one holding the marker file
  MARKER_FILE (the first file of every staging directory) and nothing but artifact files (manifest.json,
  tokenizer.json, shard-NNN.bin, shaders/*.wgsl). Anything else is refused by name, before compiling and again at
  the rename; `-o .` (or any directory holding the current one) is refused outright.
- Every compile stages in a directory of its own (.<name>.kiln-tmp-<pid>-<random>), so concurrent compiles of one
  target never share a file. `finish` (the self-test) runs on the staged copy, before the rename: an interrupted
  compile never leaves an artifact without its self-test.
- The rename is atomic. Replacing an existing artifact swaps the two directories with one renameat2(RENAME_EXCHANGE)
  where the OS has it (Linux), else moves the old one aside first. replace=False (the cache): when `out` appeared
  while we compiled, the first rename wins and ours is discarded.
- Removing an old artifact or a dead compile's staging directory unlinks only artifact files: a stray file of the
  user's keeps its directory alive instead of being deleted.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import socket
import sys
from pathlib import Path

from .errors import KilnError

MARKER_FILE = ".kiln-artifact"
_ARTIFACT_FILE = re.compile(r"manifest\.json|tokenizer\.json|shard-\d+\.bin|\.kiln-artifact|\.manifest\.json\.\w+\.tmp")
_SHADER_FILE = re.compile(r"[\w.-]+\.wgsl")
_STAGING = re.compile(r"\.(?P<name>.+)\.kiln-(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+")


def marker_text() -> str:
    return json.dumps({"kiln": "compiled artifact, written by `kiln compile`; kiln may replace this directory",
                       "pid": os.getpid(), "host": socket.gethostname()}) + "\n"


def check_target(out: Path) -> None:
    """Raises KilnError unless kiln may write the artifact directory `out`."""
    out = Path(out)
    here = Path.cwd().resolve()
    resolved = out.resolve()
    if out.name in ("", ".", "..") or resolved == here or resolved in here.parents:
        raise KilnError(f"-o {out}: that is the current directory or one above it; kiln writes an artifact as a "
                        "directory of its own: name a new one, e.g. -o ./my-model")
    reason = _not_ours(out)
    if reason:
        raise KilnError(f"{out}: {reason}; kiln writes only into a new or empty directory or one it made: choose "
                        f"another -o (nothing was changed)")


def _not_ours(out: Path) -> str | None:
    """Why kiln must not replace `out` (None: absent, empty, or a kiln artifact with nothing else in it)."""
    if out.is_symlink():
        return "is a symbolic link, not a kiln artifact directory"
    if not out.exists():
        return None
    if not out.is_dir():
        return "exists and is not a kiln artifact directory (it is a file)"
    entries = sorted(out.iterdir())
    if not entries:
        return None
    if not (out / MARKER_FILE).is_file():
        if (out / "manifest.json").exists():
            return (f"holds a manifest.json but no {MARKER_FILE} marker, so it is not a kiln artifact directory "
                    f"(or one from an older kiln: delete it yourself to recompile into it)")
        return "exists, is not empty and is not a kiln artifact directory"
    for e in entries:
        if e.name == "shaders" and e.is_dir() and not e.is_symlink():
            for s in sorted(e.iterdir()):
                if not (_SHADER_FILE.fullmatch(s.name) and s.is_file() and not s.is_symlink()):
                    return f"holds shaders/{s.name}, which kiln did not write (not a kiln artifact directory)"
        elif not (_ARTIFACT_FILE.fullmatch(e.name) and e.is_file() and not e.is_symlink()):
            return f"holds {e.name}, which kiln did not write (not a kiln artifact directory)"
    return None


def remove_artifact(d: Path) -> bool:
    """Unlinks the artifact files of `d`, then the directory if that left it empty. False when something else stayed."""
    d = Path(d)
    if d.is_symlink() or not d.is_dir():
        return False
    shaders = d / "shaders"
    if shaders.is_dir() and not shaders.is_symlink():
        for s in shaders.iterdir():
            if _SHADER_FILE.fullmatch(s.name) and (s.is_file() or s.is_symlink()):
                s.unlink(missing_ok=True)
        _rmdir(shaders)
    for e in d.iterdir():
        if _ARTIFACT_FILE.fullmatch(e.name) and (e.is_file() or e.is_symlink()):
            e.unlink(missing_ok=True)
    return _rmdir(d)


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _clean_stale(parent: Path, name: str):
    """Removes staging / set-aside directories of `name` left by a compile on this host that no longer runs."""
    host = socket.gethostname()
    for d in parent.glob(f".*.kiln-*-*"):
        got = _STAGING.fullmatch(d.name)
        if not got or got["name"] != name or int(got["pid"]) == os.getpid() or _alive(int(got["pid"])):
            continue
        try:
            if json.loads((d / MARKER_FILE).read_text()).get("host") == host:
                remove_artifact(d)
        except (OSError, ValueError, AttributeError):
            pass        # not ours, or not readable: leave it


def _new_dir(parent: Path, stem: str) -> Path:
    for _ in range(100):
        d = parent / f"{stem}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            d.mkdir()            # respects the umask, unlike tempfile.mkdtemp's 0700
            return d
        except FileExistsError:
            continue
    raise KilnError(f"{parent}: cannot create a staging directory")


def staging_dir(out: Path) -> Path:
    """A new, marked, empty directory beside `out` (same file system, so the final rename is atomic)."""
    out = Path(out).absolute()
    check_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(out.parent, out.name)
        tmp = _new_dir(out.parent, f".{out.name}.kiln-tmp")
        (tmp / MARKER_FILE).write_text(marker_text())
    except OSError as e:
        raise KilnError(f"{out.parent}: cannot write there ({e.strerror or e})") from None
    return tmp


def install(tmp: Path, out: Path, *, replace: bool = True) -> Path:
    """Renames the staged artifact `tmp` to `out` (see the module docstring). `tmp` is gone afterwards."""
    out = Path(out)
    try:
        os.rename(tmp, out)          # out absent, or an empty directory: one atomic step
        return out
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            remove_artifact(tmp)
            raise KilnError(f"cannot move the compiled artifact to {out}: {e.strerror or e}") from None
    if not replace:                  # a concurrent compile of the same cache entry got there first
        remove_artifact(tmp)
        return out
    reason = _not_ours(out)
    if reason:                       # something appeared there while we compiled
        remove_artifact(tmp)
        raise KilnError(f"{out}: {reason}; nothing was changed")
    if _exchange(tmp, out):          # tmp now holds the old artifact
        remove_artifact(tmp)
        return out
    old = out.parent / f".{out.name}.kiln-old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    os.rename(tmp, out)
    remove_artifact(old)
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two directories (Linux renameat2 RENAME_EXCHANGE). False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise KilnError(f"cannot replace {b}: {os.strerror(err)}")


def write_artifact(out: Path, write, *, finish=None, replace: bool = True) -> Path:
    """Stages, writes, finishes and installs one artifact; the staging directory never outlives the call."""
    out = Path(out)
    tmp = staging_dir(out)
    try:
        write(tmp)
        if finish is not None:
            finish(tmp)                  # e.g. the self-test: it runs on the complete artifact, before the rename
        return install(tmp, out, replace=replace)
    finally:
        if tmp.exists():
            remove_artifact(tmp)
