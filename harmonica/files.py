"""Files written whole, and run directories held by one process at a time.

Every file harmonica writes goes through `write_file` (`write_files` for files that belong together,
`append_line` for the training log): the bytes go to a temporary file in the destination's directory, are
flushed to disk (fsync) and renamed over the destination (`os.replace`, atomic on POSIX), so a reader sees
the old file or the new one, never a part of it. A failed write (a full disk, an I/O error) removes the
temporary file and raises `WriteError`: one line naming the destination and the cause.

`check_out_file` and `check_out_dir` check an output before any work; `one_line` is an error's message as the
commands print it.

`RunLock` is an exclusive `fcntl.flock` on `<run dir>/.harmonica.lock`, which records the holder's pid and
host. The kernel drops a flock when its process ends however it ends, so a lock file left by a crash is
stale and the next run takes it over; a second live run fails at once naming the holder.
"""

import contextlib
import errno
import fcntl
import io
import os
import socket
import tempfile
from pathlib import Path

LOCK_FILE = ".harmonica.lock"


class WriteError(OSError):
    """A file that could not be written; nothing of it was left behind. str(): one line naming the path."""

    def __str__(self) -> str:
        return f"{self.filename}: expected to write it, got {self.strerror} (nothing written)"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path, data) -> Path:
    """Write `data` (bytes, or str as UTF-8) to `path` whole: a temporary file beside it, fsync, rename.
    WriteError (an OSError) naming `path` when that fails; the previous file, if any, is left as it was."""
    return write_files({path: data})[0]


def write_files(contents: dict) -> list:
    """`write_file` for several files ({path: data}) that belong together (a router's weights and info): every
    temporary file is written and flushed before the first rename, so a full disk changes none of them."""
    staged = []
    try:
        for path, data in contents.items():
            path = Path(path)
            staged.append((path, _staged(path, data.encode() if isinstance(data, str) else data)))
        for path, tmp in staged:
            try:
                os.replace(tmp, path)
            except OSError as error:
                raise WriteError(error.errno, error.strerror, str(path)) from None
    finally:
        for _, tmp in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    for directory in {path.parent for path, _ in staged}:
        _fsync_dir(directory)
    return [path for path, _ in staged]


def _staged(path: Path, data: bytes) -> str:
    """A temporary file beside `path` holding `data`, flushed to disk, with the mode open() would give."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise WriteError(error.errno, error.strerror, str(path)) from None
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise WriteError(error.errno, error.strerror or str(error), str(path)) from None
    return tmp


def file_bytes(write) -> bytes:
    """What `write(file)` writes to a binary file (e.g. `lambda f: torch.save(state, f)`, PIL's `image.save`,
    matplotlib's `fig.savefig`), collected in memory for `write_file`."""
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def append_line(path, line: str) -> None:
    """Append `line` + newline to `path` (created if missing) in one write; on failure the file is cut back
    to its previous length (removed if this call created it) and WriteError names it."""
    path = Path(path)
    data = (line + "\n").encode()
    existed = path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as error:
        raise WriteError(error.errno, error.strerror, str(path)) from None
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
        except OSError as error:
            os.ftruncate(fd, size)
            if not existed:
                os.unlink(path)
            raise WriteError(error.errno, error.strerror, str(path)) from None
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: some file systems refuse fsync on a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class RunLock:
    """`with RunLock(directory, option):` holds `directory` (created if missing) for this process alone.
    ValueError naming `option`, the directory and the holder's pid and host when another process holds it.
    On exit the lock file is removed, and the directories this lock created too when they are empty."""

    def __init__(self, directory, option: str = "--out"):
        self.directory, self.option = Path(directory), option
        self.path = self.directory / LOCK_FILE
        self.fd = None
        self.created = []  # the directories this lock made, deepest first

    def __enter__(self) -> "RunLock":
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"{self.option}: expected a directory, got {self.directory} (a file)")
        if not self.directory.is_dir():
            missing = [self.directory, *self.directory.parents]
            self.created = missing[:next(i for i, d in enumerate(missing) if d.exists())]
            try:
                self.directory.mkdir(parents=True)
            except OSError as error:
                self._remove_directory()
                raise ValueError(f"{self.option}: expected a directory it can create, got {self.directory} "
                                 f"({error.strerror})") from None
        while True:  # until the locked file is the one at self.path (a releasing holder unlinks it)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                self._remove_directory()
                raise ValueError(f"{self.option}: expected a writable run directory, got {self.directory} "
                                 f"({error.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise ValueError(f"{self.option}: expected a run directory no other run uses, got {self.directory} "
                                 f"held by {holder} (its lock file {self.path}); wait for it or use another "
                                 f"directory") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still held: a waiting opener sees another inode and retries
        os.close(self.fd)
        self.fd = None
        self._remove_directory()

    def _remove_directory(self) -> None:
        for directory in self.created:
            try:
                directory.rmdir()  # only when empty
            except OSError:
                return


def check_out_file(path: str, option: str, suffixes, what: str) -> Path:
    """An output file, checked before any work: a name ending in one of `suffixes` (`what` says which) and
    an existing, writable parent directory. ValueError naming `option` otherwise."""
    out = Path(path)
    if out.is_dir() or out.suffix.lower() not in suffixes:
        raise ValueError(f"{option}: expected {what}, got {'the directory ' + path if out.is_dir() else repr(path)}")
    check_out_dir(out.parent, option)
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"{option}: expected a writable file, got {path} (read-only)")
    return out


def check_out_dir(directory: Path, option: str) -> Path:
    """`directory` when it exists and is writable; ValueError naming `option` otherwise."""
    if not directory.is_dir():
        what = "not a directory" if directory.exists() else "does not exist"
        raise ValueError(f"{option}: expected an existing directory, got {directory} ({what})")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: expected a writable directory, got {directory} (not writable)")
    return directory


def one_line(error: Exception) -> str:
    """The error's message; an OSError's as `path: cause`."""
    if isinstance(error, OSError) and not isinstance(error, WriteError):
        where = error.filename if error.filename is not None else "file system"
        return f"{where}: {error.strerror or error}"
    return str(error)
