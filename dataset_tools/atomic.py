"""An output file that appears complete or not at all, even if the writer is killed with SIGKILL.

On Linux the data goes into an unnamed file (O_TMPFILE) in the destination folder: if the process dies, the
kernel frees it and nothing is left to clean up. Only `prepare()` gives it a hidden name (linkat) and `commit()`
renames it over the destination. Where O_TMPFILE is unsupported (NFS, Lustre, non-Linux) a hidden
`.NAME.partial-PID` file is used from the start; it is removed on any exception, Ctrl-C or SIGTERM, and stale ones
of dead processes are swept on the next run.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os

_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


def _linkat_follow(src: str, dst: str) -> None:
    # os.link cannot pass AT_SYMLINK_FOLLOW on every Python; /proc/self/fd/N must be followed, not linked.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def check_writable(path: str) -> str | None:
    """Why `path` cannot be written as a new file, or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a folder"
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    return None


def check_folder_output(out: str) -> str | None:
    """Why a shard set cannot be written into folder `out`, or None; the folder is created if its parent exists.
    (deit3-convert checks it before converting, and before submitting the shard tasks that write there.)"""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"{out} exists and is not a folder (a shard set is written into a folder)"
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        return f"folder {parent} does not exist"
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder: {e.strerror or e}"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"folder {out} is not writable"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def partial_name(final: str) -> str:
    """The hidden temporary of `final` for this process: `.NAME.partial-PID` beside it."""
    folder, name = os.path.split(os.path.abspath(final))
    return os.path.join(folder, f".{name}.partial-{os.getpid()}")


def sweep_stale(final: str) -> list[str]:
    """Remove `.NAME.partial-PID` files of `final` whose process is gone (left by a SIGKILL mid-write)."""
    folder, name = os.path.split(os.path.abspath(final))
    removed = []
    for p in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.partial-*")):
        try:
            pid = int(p.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            try:
                os.remove(p)
                removed.append(p)
            except OSError:
                pass
    return removed


class AtomicOutput:
    """`with AtomicOutput(final) as out: write(out.path); out.commit()` — `out.path` can be opened by name, also
    from child processes, while the file is being written."""

    def __init__(self, final: str):
        self.final = os.path.abspath(final)
        self.folder = os.path.dirname(self.final)
        self._fd: int | None = None
        self._named: str | None = None
        self.committed = False

    def _partial_name(self) -> str:
        return partial_name(self.final)

    def sweep_stale(self) -> list[str]:
        return sweep_stale(self.final)

    def __enter__(self) -> AtomicOutput:
        self.sweep_stale()
        try:
            self._fd = os.open(self.folder, os.O_TMPFILE | os.O_RDWR, 0o644)
            # By pid, not /proc/self: worker processes open this path too and must reach the same file.
            self.path = f"/proc/{os.getpid()}/fd/{self._fd}"
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (
                errno.EOPNOTSUPP,
                errno.EISDIR,
                errno.EINVAL,
                errno.ENOENT,
                errno.ENOTSUP,
            ):
                raise
            self._named = self._partial_name()
            self._fd = os.open(self._named, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            self.path = self._named
        return self

    def write_text(self, text: str) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(text)

    def prepare(self) -> None:
        """Flush the file and give it its hidden `.NAME.partial-PID` name, closing it: everything that can fail on a
        full disk (delayed allocation, a new directory entry) fails here, before anything replaces a previous file,
        and a file prepared among many holds no descriptor."""
        if self._fd is None:
            return
        os.fsync(self._fd)
        if self._named is None:
            hidden = self._partial_name()
            _linkat_follow(f"/proc/self/fd/{self._fd}", hidden)
            self._named = hidden
        os.close(self._fd)
        self._fd = None

    def commit(self) -> None:
        assert self._named is not None or self._fd is not None, "nothing to commit"
        self.prepare()
        assert self._named is not None  # prepare() gave the data a name
        os.replace(self._named, self.final)
        self._named = None
        self.committed = True

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._named is not None:
            try:
                os.remove(self._named)
            except FileNotFoundError:
                pass
            self._named = None


def write_atomic(path: str | os.PathLike, write) -> None:
    """Files this process writes itself (checkpoints, reports, results): `write(f)` into a hidden
    `.NAME.partial-PID` beside `path`, fsync, rename over `path`. A crash or SIGKILL leaves the previous `path`
    intact and at most the partial, which is never read and is swept by the next write of `path`."""
    path = os.fspath(path)
    sweep_stale(path)
    tmp = partial_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))
