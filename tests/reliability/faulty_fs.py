"""Run a Python program with file-system faults injected under one directory: an
unprivileged stand-in for a read-only mount, a full disk or a kill, usable in CI and as
root (root ignores file modes, and a real full disk needs a mount).

    python tests/reliability/faulty_fs.py --read-only DIR -- tools/preprocess.py ARGS...
    python tests/reliability/faulty_fs.py --full-disk DIR:BYTES -- tools/preprocess.py ...
    python tests/reliability/faulty_fs.py --kill-at-replace DIR:N -- tools/preprocess.py ...

- `--read-only DIR`: opening a file under DIR for writing, creating a directory,
  renaming or removing there fail with EROFS, as the kernel reports them (with the path).
- `--full-disk DIR:BYTES`: files opened for writing under DIR take BYTES bytes in all;
  then `write` fails with ENOSPC and, like the kernel's, the error names no file.
- `--kill-at-replace DIR:N`: the N-th `os.replace` into DIR kills the process (SIGKILL,
  so no handler or `finally` runs).

Only this process is patched (preprocessing workers only tokenize; the main process
writes every output file).
"""

from __future__ import annotations

import argparse
import builtins
import errno
import io
import os
import runpy
import signal
import sys
from pathlib import Path


def _under(path, root: Path) -> bool:
    if isinstance(path, int):
        return False
    try:
        resolved = Path(os.path.abspath(os.fsdecode(path)))
    except TypeError:
        return False
    return resolved == root or root in resolved.parents


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


class _Budget:
    def __init__(self, total: int) -> None:
        self.left = total

    def take(self, n: int) -> None:
        if n > self.left:
            self.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= n


class _MeteredFile:
    """A file object whose writes draw on a shared byte budget."""

    def __init__(self, file, budget: _Budget) -> None:
        self._file = file
        self._budget = budget

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        self._budget.take(size)
        return self._file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
        return False

    def __iter__(self):
        return iter(self._file)

    def __getattr__(self, name):
        return getattr(self._file, name)


def read_only(root: Path) -> None:
    real_open, real_os_open = builtins.open, os.open

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def patched_open(file, mode="r", *args, **kwargs):
        if _writes(mode) and _under(file, root):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def patched_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, root):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guard(real, *checked):
        def wrapper(*args, **kwargs):
            for index in checked:
                if len(args) > index and _under(args[index], root):
                    refuse(args[index])
            return real(*args, **kwargs)

        return wrapper

    builtins.open = io.open = patched_open
    os.open = patched_os_open
    os.mkdir = guard(os.mkdir, 0)
    os.unlink = os.remove = guard(os.unlink, 0)
    os.replace = guard(os.replace, 0, 1)
    os.rename = guard(os.rename, 0, 1)


def full_disk(root: Path, total: int) -> None:
    real_open = builtins.open
    budget = _Budget(total)

    def patched_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if _writes(mode) and _under(file, root):
            return _MeteredFile(handle, budget)
        return handle

    builtins.open = io.open = patched_open


def kill_at_replace(root: Path, n: int) -> None:
    real_replace = os.replace
    count = [0]

    def patched(src, dst, *args, **kwargs):
        if _under(dst, root):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fault = parser.add_mutually_exclusive_group(required=True)
    fault.add_argument("--read-only", metavar="DIR")
    fault.add_argument("--full-disk", metavar="DIR:BYTES")
    fault.add_argument("--kill-at-replace", metavar="DIR:N")
    parser.add_argument("program")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.read_only:
        read_only(Path(os.path.abspath(args.read_only)))
    elif args.full_disk:
        directory, _, size = args.full_disk.rpartition(":")
        full_disk(Path(os.path.abspath(directory)), int(size))
    else:
        directory, _, n = args.kill_at_replace.rpartition(":")
        kill_at_replace(Path(os.path.abspath(directory)), int(n))
    program_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    sys.argv = [args.program, *program_args]
    runpy.run_path(args.program, run_name="__main__")


if __name__ == "__main__":
    main()
