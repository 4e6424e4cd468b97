"""replace_text_atomically: the new content in place of the old, no temporary left, and
a failure before the rename leaves the old file whole."""

from __future__ import annotations

import os

import pytest

from megatron_longalign.utils import atomic_files
from megatron_longalign.utils.atomic_files import replace_text_atomically


def test_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    replace_text_atomically(path, '{"score": 7.5, "名": 1}\n')
    assert path.read_text(encoding="utf-8") == '{"score": 7.5, "名": 1}\n'
    assert os.listdir(tmp_path) == ["summary.json"]


def test_a_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_files.os, "replace", no_rename)
    with pytest.raises(OSError, match="summary.json"):
        replace_text_atomically(path, "new")
    assert path.read_text() == "old"
