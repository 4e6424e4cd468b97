"""The training chat template in an exported HF directory.

Serving must render prompts exactly as training did, so export writes the template's
Jinja (data/templates.py) as `chat_template` in tokenizer_config.json, and names the
template in `longalign.json` (what evaluation reads back). Which template: the one
given explicitly, else the one the checkpoint records (`extra["data"]["template"]`,
P.json's {"name", "format"} entry), else the one the training data's P.json names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from megatron_longalign.convert.errors import ConversionError
from megatron_longalign.data.templates import TEMPLATES, get_template

logger = logging.getLogger(__name__)

EXPORT_RECORD = "longalign.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Files through which transformers would load another chat template than ours.
_OTHER_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


def recorded_template(extra: dict[str, Any]) -> str | None:
    """The template name a checkpoint's marker records, if any."""
    entry = (extra.get("data") or {}).get("template")
    if isinstance(entry, dict):
        entry = entry.get("name")
    return entry if isinstance(entry, str) and entry else None


def data_template(prefix: str | Path) -> str:
    """The template a preprocessed set (P.json) was tokenized with."""
    from megatron_longalign.data.indexed import DataFileError, read_metadata

    try:
        metadata = read_metadata(str(prefix))
    except DataFileError as err:
        raise ConversionError(str(err)) from err
    name = (metadata.get("template") or {}).get("name")
    if name not in TEMPLATES:
        raise ConversionError(f"{prefix}.json names no known template (found {name!r})")
    return name


def resolve_template(
    explicit: str | None, extra: dict[str, Any], data_prefix: str | Path | None = None
) -> str | None:
    """explicit > checkpoint record > the data's P.json; None when nothing says (then no
    chat template is written, with a warning)."""
    recorded = recorded_template(extra)
    if recorded is None and data_prefix is not None:
        recorded = data_template(data_prefix)
    if explicit is not None:
        if explicit not in TEMPLATES:  # before any work
            raise ConversionError(
                f"unknown template {explicit!r}; choose one of {sorted(TEMPLATES)}"
            )
        if recorded is not None and recorded != explicit:
            logger.warning(
                "exporting chat template %r, but the model was trained with %r", explicit, recorded
            )
        return explicit
    if recorded is not None and recorded not in TEMPLATES:
        raise ConversionError(f"the checkpoint records an unknown template {recorded!r}")
    return recorded


def write_chat_template(directory: Path, name: str, record: dict[str, Any]) -> None:
    """Put template `name` into `directory`'s tokenizer_config.json (created if the
    tokenizer files had none: a bare sentencepiece model) and write longalign.json."""
    config_path = directory / TOKENIZER_CONFIG
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ConversionError(f"{config_path} (copied tokenizer file): {err}") from None
    config["chat_template"] = get_template(name).jinja
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for stale in _OTHER_TEMPLATE_FILES:
        (directory / stale).unlink(missing_ok=True)
    record = {"template": name, **record}
    (directory / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def exported_template(directory: str | Path) -> str | None:
    """The training template of an HF directory: longalign.json's, else the template
    whose Jinja equals tokenizer_config.json's chat_template; None if neither."""
    directory = Path(directory)
    record = directory / EXPORT_RECORD
    if record.is_file():
        name = json.loads(record.read_text(encoding="utf-8")).get("template")
        if name in TEMPLATES:
            return name
    config = directory / TOKENIZER_CONFIG
    if config.is_file():
        jinja = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        for template in TEMPLATES.values():
            if template.jinja == jinja:
                return template.name
    return None
