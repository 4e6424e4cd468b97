"""Long documents to build samples from, with stable ids.

Two inputs:
- a directory: every `*.txt` / `*.md` file below it (sorted), UTF-8; the id is the path
  relative to the directory (so it survives a rerun and names the file);
- JSONL files: one object per line with a string `text` and an optional `id` (string or
  integer); without an id, the id is `sha256:` + the first 16 hex digits of the text's
  hash, so the same text always gets the same id whatever the line order.
Ids key resume and the random choices, so they must be unique: a repeated id is an error
naming both places. Everything is checked here, before any request is paid for.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md")


class DocumentError(ValueError):
    """An input cannot be read as documents; the message names the file (and line)."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str  # "path" or "path:line", for messages


def text_id(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _directory_documents(root: Path) -> Iterator[Document]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DocumentError(f"{root}: no {'/'.join(TEXT_SUFFIXES)} files in this directory")
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DocumentError(f"{path}: not UTF-8 text ({err})") from None
        yield Document(path.relative_to(root).as_posix(), text, str(path))


def _record_document(record: object, where: str) -> Document:
    if not isinstance(record, dict):
        raise DocumentError(f"{where}: expected a JSON object with a 'text' field")
    text = record.get("text")
    if not isinstance(text, str):
        found = "no 'text' field" if text is None else f"'text' is {type(text).__name__}"
        raise DocumentError(f"{where}: {found} (each line needs a string 'text')")
    raw_id = record.get("id")
    if raw_id is None:
        return Document(text_id(text), text, where)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id) == "":
        raise DocumentError(f"{where}: 'id' must be a non-empty string or an integer")
    return Document(str(raw_id), text, where)


def _jsonl_documents(path: Path) -> Iterator[Document]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DocumentError(f"{where}: not a JSON line ({err})") from None
            yield _record_document(record, where)


def read_documents(inputs: Sequence[str | os.PathLike]) -> list[Document]:
    """Every document of `inputs` (directories and JSONL files), in input order."""
    documents: list[Document] = []
    first_seen: dict[str, str] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _directory_documents(path)
        elif path.is_file():
            found = _jsonl_documents(path)
        else:
            raise DocumentError(f"{path}: no such file or directory")
        for document in found:
            if document.id in first_seen:
                raise DocumentError(
                    f"{document.source}: document id {document.id!r} already used at "
                    f"{first_seen[document.id]} (ids must be unique: they key resume)"
                )
            first_seen[document.id] = document.source
            documents.append(document)
    return documents
