"""Write several files under temporary names and publish them together at the end.

Each output is first written to `<final>.tmp-<pid>`; `commit()` renames them into place
in registration order (register the file that marks completion, e.g. the metadata JSON,
last), and `abort()` deletes them. A crash therefore never leaves a half-written output
under a final name.
"""

from __future__ import annotations

import os
from pathlib import Path


class AtomicFileSet:
    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final)

    def temp_path(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        temp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        self._pending.append((temp, final))
        return temp

    def commit(self) -> None:
        for temp, final in self._pending:
            if temp.exists():
                os.replace(temp, final)
        self._pending.clear()

    def abort(self) -> None:
        for temp, _ in self._pending:
            temp.unlink(missing_ok=True)
        self._pending.clear()
