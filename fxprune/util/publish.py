"""Atomic publishing: outputs appear whole or not at all, and inputs are never touched.

Every writer in fxprune (``save``, the CLI's output directories, ONNX files, reports) goes through
:class:`Publication`:

1. **Checked before any work**: the destination must not exist (unless ``overwrite``), its
   parent must be writable, and it must not be, contain, or lie inside any *protected* path --
   with or without ``overwrite``.  Protected are the paths passed as ``protect`` and every input
   fxprune itself has read in this process (:func:`note_input`: model directories, checkpoints,
   calibration and data files), so the Python API is as safe as the CLI.
2. **Locked**: one run at a time per destination (an ``flock`` on a lock file beside it), so two
   concurrent runs into one ``--out`` fail clearly instead of racing.
3. **Filled in a temporary sibling** (same filesystem, so the final move is a rename).
4. **Published atomically**: a directory is renamed into place; files are hard-linked into place
   (``link`` refuses to replace a file that appeared meanwhile), side files first, the main file
   last.  A destination that appeared during the run is refused unless ``overwrite``.
5. **Cleaned up** on any error or interrupt: no temporary directory is left behind.  The steps
   that must not be cut in half (the final renames, putting an old output back, removing the
   temporary directory) hold SIGINT/SIGTERM until they are done
   (:func:`fxprune.util.interrupts.deferred`).

Modes follow the umask, as files written with ``open()`` do (``mkdtemp`` alone would give 0700).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from fxprune.errors import OutputExistsError, OutputPermissionError, UnsafeOutputError
from fxprune.util.interrupts import deferred

__all__ = ["Publication", "atomic_write_text", "check_destination", "current_umask", "inputs_read",
           "note_input", "publish_dir"]

_INPUTS: set[str] = set()


def note_input(path: str | os.PathLike | None) -> None:
    """Record a file or directory fxprune read: no output of this process may replace it."""
    if path is not None and os.path.lexists(os.fspath(path)):
        _INPUTS.add(os.path.realpath(os.path.abspath(os.fspath(path))))


def inputs_read() -> list[str]:
    """Every input :func:`note_input` recorded in this process."""
    return sorted(_INPUTS)


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything under it) the modes ``open()`` would."""
    mask = current_umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    os.chmod(p, (os.stat(p).st_mode | 0o666) & 0o777 & ~mask)
    elif path.exists():
        os.chmod(path, (os.stat(path).st_mode | 0o666) & 0o777 & ~mask)


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_destination(dest: str | os.PathLike, *, overwrite: bool, protect: Iterable[str | os.PathLike] = (),
                      what: str = "output") -> Path:
    """Refuse a destination that exists (without ``overwrite``) or that touches a protected path.

    A destination is unsafe when it *is* a protected path, *contains* one (replacing it would
    delete the input), or lies *inside* a protected directory (it would write into the user's
    checkpoint).  Raises :class:`UnsafeOutputError` or :class:`OutputExistsError` naming both paths.
    """
    path = _real(dest)
    for p in [*protect, *_INPUTS]:
        if p is None:
            continue
        src = _real(p)
        if _is_within(src, path):
            rel = "is" if src == path else "contains"
            raise UnsafeOutputError(
                f"{what} {os.fspath(dest)} {rel} the input {os.fspath(p)}; choose another --out "
                "(fxprune never writes over or deletes its inputs)"
            )
        if src.is_dir() and _is_within(path, src):
            raise UnsafeOutputError(
                f"{what} {os.fspath(dest)} lies inside the input directory {os.fspath(p)}; choose a "
                "path outside it (fxprune never writes into its inputs)"
            )
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{what} {os.fspath(dest)} exists; pass --overwrite (overwrite=True) to replace it")
    _check_writable(path, dest, what)
    return path


def _check_writable(path: Path, dest: str | os.PathLike, what: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory (checked up front)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPermissionError(f"{what} {os.fspath(dest)}: {parent} is not a directory")
    try:  # a real probe: permission bits say nothing for root or a read-only filesystem
        fd, probe = tempfile.mkstemp(prefix=".fxprune-probe-", dir=parent)
    except OSError as exc:
        raise OutputPermissionError(
            f"{what} {os.fspath(dest)} cannot be written: {parent} is not writable "
            f"({exc.strerror or exc}); choose another --out"
        ) from None
    os.close(fd)
    os.unlink(probe)


class _Lock:
    """A non-blocking exclusive ``flock`` on ``<parent>/.<name>.fxprune-lock``."""

    def __init__(self, dest: Path) -> None:
        self.path = dest.parent / f".{dest.name}.fxprune-lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        for _ in range(16):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputExistsError(
                        f"another fxprune run is writing to {self.path.parent / self.path.name[1:-14]}; "
                        "wait for it or choose another output"
                    ) from None
                raise
            try:  # the file may have been unlinked by its previous holder: lock the live one
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    self.fd = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)
        raise OutputExistsError(f"could not lock {self.path}")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


class Publication:
    """Fill a temporary sibling of ``dest``, then publish it atomically (see the module docs).

    ``kind="dir"``: ``dest`` is a directory; ``tmp`` is an empty directory to fill and becomes
    ``dest``.  ``kind="files"``: ``dest`` is a file; ``tmp`` is a directory to write ``dest``'s
    name (and side files such as external weights) into; they land next to ``dest``.

        with Publication(out, overwrite=False, protect=[model_dir]) as pub:
            write_things(pub.tmp)
            pub.commit()
    """

    def __init__(self, dest: str | os.PathLike, *, overwrite: bool = False,
                 protect: Iterable[str | os.PathLike] = (), kind: str = "dir", what: str = "output") -> None:
        if kind not in ("dir", "files"):
            raise ValueError(f"kind must be 'dir' or 'files', got {kind!r}")
        self.dest_arg = os.fspath(dest)
        self.protect = [p for p in protect if p is not None and os.path.lexists(os.fspath(p))]
        self.overwrite = overwrite
        self.kind = kind
        self.what = what
        self.dest = check_destination(dest, overwrite=overwrite, protect=self.protect, what=what)
        if kind == "files" and self.dest.is_dir():
            raise OutputExistsError(f"{what} {self.dest_arg} is a directory; give a file path")
        self.tmp: Path | None = None
        self.committed = False
        self._lock = _Lock(self.dest)
        self._depth = 0

    def __enter__(self) -> "Publication":
        """Lock the destination and make the temporary directory (re-entrant: a CLI command
        reserves its output before loading the model, and the writer enters it again)."""
        self._depth += 1
        if self._depth > 1:
            return self
        parent = self.dest.parent
        with deferred():
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except PermissionError:
                self._depth = 0
                raise OutputPermissionError(f"{self.what} {self.dest_arg}: cannot create {parent} (permissions)") from None
            try:
                self._lock.acquire()
            except BaseException:
                self._depth = 0
                raise
            try:
                self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".fxprune-tmp", dir=parent))
            except BaseException:
                self._depth = 0
                self._lock.release()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        with deferred():
            try:
                if self.tmp is not None and self.tmp.exists():
                    shutil.rmtree(self.tmp, ignore_errors=True)
            finally:
                self._lock.release()

    def commit(self) -> Path:
        """Move the filled temporary into place; refuses a destination that appeared meanwhile."""
        assert self.tmp is not None, "commit() outside the with-block"
        # re-check: an input may have been created at the destination during the run
        check_destination(self.dest_arg, overwrite=True, protect=self.protect, what=self.what)
        with deferred():
            if self.kind == "dir":
                self._commit_dir()
            else:
                self._commit_files()
            self.committed = True
        return self.dest

    def _commit_dir(self) -> None:
        assert self.tmp is not None
        _apply_umask(self.tmp)
        if os.path.lexists(self.dest):
            if not self.overwrite:
                raise OutputExistsError(
                    f"{self.what} {self.dest_arg} appeared during the run; nothing was written "
                    "(pass --overwrite to replace it)"
                )
            trash = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".fxprune-old", dir=self.dest.parent))
            os.replace(self.dest, trash / "old")
            try:
                os.replace(self.tmp, self.dest)
            except BaseException:
                os.replace(trash / "old", self.dest)  # put the old output back
                raise
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.mkdir(self.dest)  # claims the name: fails if it appeared meanwhile
            except FileExistsError:
                raise OutputExistsError(
                    f"{self.what} {self.dest_arg} appeared during the run; nothing was written"
                ) from None
            os.replace(self.tmp, self.dest)  # replaces the empty directory we just made

    def _commit_files(self) -> None:
        assert self.tmp is not None
        main = self.tmp / self.dest.name
        if not main.exists():
            raise FileNotFoundError(f"nothing was written to {main}")
        files = [f for f in sorted(self.tmp.iterdir()) if f != main] + [main]
        targets = [self.dest.parent / f.name for f in files]
        for f in files:
            _apply_umask(f)
        if not self.overwrite:
            taken = [str(t) for t in targets if os.path.lexists(t)]
            if taken:
                raise OutputExistsError(f"{', '.join(taken)} appeared during the run; nothing was written")
        placed: list[Path] = []
        try:
            for f, t in zip(files, targets):
                if self.overwrite:
                    os.replace(f, t)
                else:
                    try:
                        os.link(f, t)  # atomic create-if-absent
                    except FileExistsError:
                        raise OutputExistsError(f"{t} appeared during the run; nothing was written") from None
                    except OSError:  # no hard links here: best effort
                        if os.path.lexists(t):
                            raise OutputExistsError(f"{t} appeared during the run; nothing was written") from None
                        os.replace(f, t)
                placed.append(t)
        except BaseException:
            if not self.overwrite:
                for t in placed:
                    with contextlib.suppress(OSError):
                        os.unlink(t)
            raise

    @property
    def files(self) -> list[str]:
        """Names of the files written so far into ``tmp``."""
        return sorted(f.name for f in self.tmp.iterdir()) if self.tmp else []


@contextlib.contextmanager
def publish_dir(dest: str | os.PathLike, *, overwrite: bool = False,
                protect: Iterable[str | os.PathLike] = (), what: str = "output directory") -> Iterator[Path]:
    """``with publish_dir(out) as tmp: ...`` fills ``tmp`` and publishes it when the block succeeds."""
    with Publication(dest, overwrite=overwrite, protect=protect, kind="dir", what=what) as pub:
        yield pub.tmp
        pub.commit()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename (modes follow the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with deferred():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            _apply_umask(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
