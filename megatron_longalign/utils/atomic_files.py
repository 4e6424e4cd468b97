"""Publish a set of files atomically: one manifest names them, and replacing the
manifest is the single commit point.

The set of a prefix P (say `out/long`) is the manifest `P.json` and member files
`P.<tag><suffix>` (`out/long.3f2a9c0d1e4b.bin`, `out/long.3f2a9c0d1e4b.idx`, ...). The
tag is derived from the members' contents, so the same contents always get the same
names. The manifest records, for each member suffix, the file name (relative to the
manifest's directory), its size and its sha256.

Writing (`AtomicFileSet`):
1. members are written under temporary names `P<suffix>.tmp-<pid>` (`temp_path`);
2. `commit(metadata)` fsyncs and hashes them, writes the new manifest to
   `P.json.tmp-<pid>` (fsynced: it names the files about to appear), renames every
   member to its tagged name, and then `os.replace`s the manifest into place: the
   commit point;
3. only then are the previous set's members (named by the old manifest) deleted.

A crash before step 2's replace leaves the old manifest, which names the old, complete
files; a crash after it leaves the new one. What a crash can leave behind is garbage
only: temporary files of a dead pid, or tagged files no manifest names. `clean_leftovers`
removes those (at the start of the next run) and leaves a live process's files alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"
MANIFEST_SUFFIX = ".json"
TAG_LENGTH = 12
_CHUNK = 1 << 20


# ---- small helpers -----------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _is_other_live_process(pid: int) -> bool:
    # Our own pid cannot own a leftover found before we wrote anything (a restarted
    # container often gets the same pid as the run it replaces).
    return pid != os.getpid() and pid_alive(pid)


class WriteError(OSError):
    """An OSError while writing (or renaming, removing) output files; `filename` is
    always set, `action` says what failed ("write", "remove", ...)."""

    action = "write"


@contextlib.contextmanager
def naming(path: str | os.PathLike, action: str = "write") -> Iterator[None]:
    """Re-raise an OSError as a WriteError that names a file: its own, or `path` when it
    has none (a failed write() or close() on a full disk carries no file name)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        filename = err.filename if err.filename is not None else os.fspath(path)
        error = WriteError(err.errno, err.strerror or str(err), filename)
        error.action = action
        raise error from err


def describe_os_error(err: OSError) -> str:
    """`cannot write PATH: reason; what to do`, in one sentence."""
    path = err.filename if err.filename is not None else "the output"
    reason = err.strerror or str(err)
    action = getattr(err, "action", "write")
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        fix = "free space on that file system (or choose another location) and rerun"
    elif err.errno == errno.EROFS:
        fix = "the file system is read-only: choose a writable location and rerun"
    elif err.errno in (errno.EACCES, errno.EPERM):
        fix = "no permission to write there: fix the permissions or choose another location"
    else:
        fix = "fix the cause or choose another location, and rerun"
    return f"cannot {action} {path}: [Errno {err.errno}] {reason}; {fix}"


def fsync_directory(directory: str | os.PathLike, best_effort: bool = False) -> None:
    """Make renames and new files in `directory` durable: a directory entry is on disk
    only once the directory itself is fsynced. `best_effort` ignores directories that
    cannot be opened or synced (some network file systems)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)


def write_text_durably(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` (UTF-8) and fsync it before returning."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` in one step (a temporary file beside it, fsynced, then
    renamed over it): a reader, or a rerun after a kill, sees the old file or the new one,
    never half of one. The one home for summaries, merged results and reports."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with naming(temporary):
        write_text_durably(temporary, text)
    with naming(path, "replace"):
        os.replace(temporary, path)
    fsync_directory(path.parent, best_effort=True)


def file_digest(path: Path, sync: bool = False) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of `path`, read in 1 MiB chunks; `sync` also fsyncs it."""
    digest, size = hashlib.sha256(), 0
    with naming(path), open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def set_tag(digests: dict[str, str]) -> str:
    """The version tag of a set: derived from every member's suffix and sha256 only."""
    text = "".join(f"{suffix} {digests[suffix]}\n" for suffix in sorted(digests))
    return hashlib.sha256(text.encode()).hexdigest()[:TAG_LENGTH]


def manifest_path(prefix: str | os.PathLike) -> Path:
    return Path(os.fspath(prefix) + MANIFEST_SUFFIX)


def manifest_exists(prefix: str | os.PathLike) -> bool:
    """Whether `prefix.json` exists (as a file, or as a link, even a dangling one)."""
    return os.path.lexists(manifest_path(prefix))


def check_writable(prefix: str | os.PathLike, probe_bytes: int = 1 << 16) -> None:
    """Create the prefix's directory and write, fsync and delete a probe file there;
    raises OSError naming the path that failed (read-only, no permission, disk full)."""
    directory = Path(os.fspath(prefix)).parent
    with naming(directory, "create the directory"):
        directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f"{Path(os.fspath(prefix)).name}{MANIFEST_SUFFIX}{TEMP_MARK}{os.getpid()}"
    try:
        with naming(probe), open(probe, "wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def manifest_members(manifest: Path) -> dict[str, Path] | None:
    """suffix -> member path (relative to the manifest's real directory) as `manifest`
    names them; None if it cannot be read or names no files."""
    try:
        data = _read_json(manifest)
        base = manifest.resolve().parent
        return {suffix: base / record["name"] for suffix, record in dict(data["files"]).items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- writing -----------------------------------------------------------------------------


class AtomicFileSet:
    """The files of one set for `prefix`, written under temporary names and published
    together by `commit`; `abort` removes what an unfinished commit left."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        prefix = os.fspath(prefix)
        self.prefix = prefix
        self.directory = Path(prefix).parent
        self.stem = Path(prefix).name
        self.manifest = manifest_path(prefix)
        self._temps: dict[str, Path] = {}  # member suffix -> temporary path
        self._renamed: list[Path] = []  # tagged members this commit created
        self._committed = False

    def _temp_name(self, suffix: str) -> Path:
        return self.directory / f"{self.stem}{suffix}{TEMP_MARK}{os.getpid()}"

    def temp_path(self, suffix: str) -> Path:
        """Where to write the member `suffix` (e.g. ".bin") until the commit."""
        if suffix == MANIFEST_SUFFIX or suffix in self._temps:
            raise ValueError(f"member suffix {suffix!r} is reserved or already registered")
        self._temps[suffix] = self._temp_name(suffix)
        return self._temps[suffix]

    def discard(self, suffix: str) -> None:
        """Drop a member (e.g. an empty rejects file): it is not published."""
        self._temps.pop(suffix).unlink(missing_ok=True)

    def commit(
        self, metadata: dict[str, Any], legacy_suffixes: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Publish the registered members with `metadata` as the manifest (plus "tag" and
        "files"); returns the manifest. `legacy_suffixes`: members of an old manifest
        without "files" (named P<suffix>), deleted after the commit like any old set."""
        records, digests = {}, {}
        for suffix, temp in sorted(self._temps.items()):
            size, digest = file_digest(temp, sync=True)
            digests[suffix] = digest
            records[suffix] = {"bytes": size, "sha256": digest}
        tag = set_tag(digests)
        finals = {s: self.directory / f"{self.stem}.{tag}{s}" for s in self._temps}
        for suffix, record in records.items():
            records[suffix] = {"name": finals[suffix].name, **record}
        manifest = {**metadata, "tag": tag, "files": records}
        previous = self._previous_members(legacy_suffixes)
        # The journal: a dead run's temporary manifest names the files it was publishing.
        manifest_temp = self._temp_name(MANIFEST_SUFFIX)
        text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        with naming(manifest_temp):
            write_text_durably(manifest_temp, text)
        for suffix, temp in sorted(self._temps.items()):
            with naming(finals[suffix], "rename a file to"):
                os.replace(temp, finals[suffix])
            self._renamed.append(finals[suffix])
        fsync_directory(self.directory, best_effort=True)
        with naming(self.manifest, "replace"):
            os.replace(manifest_temp, self.manifest)  # the commit point
        self._committed = True
        self._temps.clear()
        fsync_directory(self.directory, best_effort=True)
        keep = {p.resolve() for p in finals.values()}
        for path in previous:
            if path.resolve() not in keep:
                with naming(path, "remove"):
                    path.unlink(missing_ok=True)
        return manifest

    def _previous_members(self, legacy_suffixes: Sequence[str]) -> list[Path]:
        """The files of the set the commit replaces: those the current manifest names
        when it is a regular file here (a linked manifest's files belong elsewhere). An
        unreadable manifest fails the commit before anything changed; a damaged one
        (not JSON) names nothing, so nothing is deleted."""
        if self.manifest.is_symlink() or not self.manifest.is_file():
            return []
        try:
            with naming(self.manifest, "read"):
                data = _read_json(self.manifest)
        except ValueError:
            return []
        here = self.directory.resolve()
        files = data.get("files") if isinstance(data, dict) else None
        if isinstance(files, dict):
            names = [r.get("name") for r in files.values() if isinstance(r, dict)]
            paths = [here / n for n in names if isinstance(n, str) and n]
            return [p for p in paths if p.parent == here]
        if isinstance(data, dict) and files is None:  # an old format: P<suffix>
            candidates = (self.directory / f"{self.stem}{s}" for s in legacy_suffixes)
            return [p for p in candidates if p.is_file()]
        return []

    def abort(self) -> None:
        """Remove temporary files and, if the manifest was not replaced yet, the tagged
        files this commit created that the current manifest does not name. Never
        raises (it runs while another error propagates)."""
        for temp in [*self._temps.values(), self._temp_name(MANIFEST_SUFFIX)]:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
        self._temps.clear()
        if not self._committed:
            current = manifest_members(self.manifest) or {}
            named = {p.resolve() for p in current.values()}
            for path in self._renamed:
                if path.resolve() not in named:
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
        self._renamed.clear()


# ---- leftovers of killed runs ------------------------------------------------------------


@dataclass
class Leftovers:
    removed: list[Path] = field(default_factory=list)  # temporary/orphan files of dead runs
    live: list[tuple[Path, int]] = field(default_factory=list)  # (file, pid): left alone
    kept_orphans: list[Path] = field(default_factory=list)  # unnamed tagged files left alone

    def messages(self, prefix: str) -> list[str]:
        lines = []
        if self.removed:
            names = ", ".join(p.name for p in self.removed)
            lines.append(
                f"removed {len(self.removed)} file(s) that an interrupted run for {prefix} "
                f"left in {self.removed[0].parent}: {names}"
            )
        for path, pid in self.live:
            lines.append(
                f"{path} belongs to process {pid}, which is still running (another run "
                f"writing {prefix}?); left alone. If that process is not a preprocessing "
                "run, delete the file by hand"
            )
        if self.kept_orphans:
            names = ", ".join(p.name for p in self.kept_orphans)
            lines.append(
                f"{len(self.kept_orphans)} file(s) for {prefix} are named by no manifest "
                f"({names}); left alone because another run is active or "
                f"{prefix}{MANIFEST_SUFFIX} is unreadable"
            )
        return lines


def clean_leftovers(prefix: str | os.PathLike, suffixes: Sequence[str]) -> Leftovers:
    """Delete what interrupted runs left for `prefix`: `P<suffix>.tmp-<pid>` files of
    dead processes, and tagged members `P.<tag><suffix>` that no manifest names. A live
    process's temporary files are reported, not touched; while one exists (or while
    P.json is unreadable or a link) unnamed tagged files are kept too."""
    prefix = os.fspath(prefix)
    directory, stem = Path(prefix).parent, Path(prefix).name
    result = Leftovers()
    if not directory.is_dir():
        return result
    alternatives = "|".join(re.escape(s) for s in [*suffixes, MANIFEST_SUFFIX])
    temp_re = re.compile(rf"{re.escape(stem)}({alternatives}){re.escape(TEMP_MARK)}(\d+)")
    member_alternatives = "|".join(re.escape(s) for s in suffixes)
    orphan_re = re.compile(rf"{re.escape(stem)}\.[0-9a-f]{{{TAG_LENGTH}}}({member_alternatives})")
    temps, tagged = [], []
    for entry in sorted(directory.iterdir()):
        if temp_re.fullmatch(entry.name):
            temps.append(entry)
        elif orphan_re.fullmatch(entry.name):
            tagged.append(entry)
    live_writer = False
    for path in temps:
        pid = int(path.name.rsplit(TEMP_MARK, 1)[1])
        if _is_other_live_process(pid):
            result.live.append((path, pid))
            live_writer = True
        else:
            with naming(path, "remove"):
                path.unlink(missing_ok=True)
            result.removed.append(path)
    if not tagged:
        return result
    manifest = manifest_path(prefix)
    named: set[Path] = set()
    if os.path.lexists(manifest):
        members = None if manifest.is_symlink() else manifest_members(manifest)
        if members is None:
            result.kept_orphans = tagged
            return result
        named = {p.resolve() for p in members.values()}
    orphans = [p for p in tagged if p.resolve() not in named]
    if live_writer:
        result.kept_orphans = orphans
        return result
    for path in orphans:
        with naming(path, "remove"):
            path.unlink(missing_ok=True)
        result.removed.append(path)
    return result


__all__ = [
    "AtomicFileSet",
    "Leftovers",
    "WriteError",
    "check_writable",
    "clean_leftovers",
    "describe_os_error",
    "file_digest",
    "manifest_exists",
    "manifest_members",
    "manifest_path",
    "naming",
    "pid_alive",
    "set_tag",
]
