"""Damaged files (`damage_bytes`), and a full disk, simulated: `os.write` to a file whose path contains a marker
writes part of the bytes, then fails with ENOSPC (as a file system that fills up mid-write). `full_disk(marker)`
is the replacement for `monkeypatch.setattr(os, "write", ...)`; as a sitecustomize, `install_from_env()` applies
it to a whole `python -m harmonica` process when HARMONICA_TEST_FULL_DISK names the marker."""

import errno
import os

ENV = "HARMONICA_TEST_FULL_DISK"
_write = os.write


def full_disk(marker: str):
    struck = set()

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if marker not in target:
            return _write(fd, data)
        if target not in struck and len(data) > 1:  # first a short write, as a filling disk gives
            struck.add(target)
            return _write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def install_from_env() -> None:
    marker = os.environ.get(ENV)
    if marker:
        os.write = full_disk(marker)


def damage_bytes(path, case: str) -> bool:
    """Damage the file `path` as `case` says ("empty", "truncated": its first half, "random-bytes": as many random
    bytes); False for another case (left to the caller)."""
    data = path.read_bytes()
    damaged = {"empty": b"", "truncated": data[:len(data) // 2], "random-bytes": os.urandom(max(len(data), 64))}
    if case not in damaged:
        return False
    path.write_bytes(damaged[case])
    return True
