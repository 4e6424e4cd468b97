"""Which model, tokenizer and chat template a generation run uses.

`--model` is an exported HF directory or a trainer checkpoint (a step directory with
complete.json, or a root with `latest`). A checkpoint is exported to a temporary
directory by convert/hf_export.export_checkpoint, in a child process (export sets up a
CPU megatron process group and the CPU shim, which must not leak into a process that
generates on a GPU); the directory is removed on `close`.

The template is the trained one (export records it, convert/export_template.py);
`--template` overrides it, with a warning when it differs.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_longalign.convert.export_template import exported_template
from megatron_longalign.data.templates import ChatTemplate, get_template

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model")
# What marks a trainer checkpoint (training/checkpoint.py: MARKER, LATEST); named here so
# this module does not import the trainer.
CHECKPOINT_MARKERS = ("complete.json", "latest")


class ModelSourceError(ValueError):
    """The model, tokenizer or template cannot be used; the message names the path."""


@dataclass
class ModelSource:
    directory: Path  # an HF model directory (config.json, weights, tokenizer)
    temporary: Path | None = None  # set when exported from a checkpoint: removed on close

    def close(self) -> None:
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None


def is_checkpoint(path: Path) -> bool:
    return any((path / name).exists() for name in CHECKPOINT_MARKERS)


def check_hf_directory(path: Path, what: str = "--model") -> None:
    """An HF model directory transformers and vLLM can load: config.json, weights and a
    tokenizer. Raises naming the path and what is missing."""
    if not path.exists():
        raise ModelSourceError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ModelSourceError(f"{what} {path} is not a directory")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_NAMES):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model)")
    if missing:
        raise ModelSourceError(
            f"{what} {path} is not a Hugging Face model directory nor a trainer checkpoint "
            f"(complete.json or latest): it lacks {', '.join(missing)}"
        )


def open_model(model: str | Path, tokenizer: str | Path | None = None) -> ModelSource:
    """The HF directory for `model`, exporting a checkpoint to a temporary one (with
    tokenizer files from `tokenizer`, else those the checkpoint's import recorded)."""
    path = Path(model)
    if path.is_dir() and is_checkpoint(path):
        return _export(path, tokenizer)
    check_hf_directory(path)
    return ModelSource(path)


def _export(checkpoint: Path, tokenizer: str | Path | None) -> ModelSource:
    temporary = Path(tempfile.mkdtemp(prefix="longalign-eval-export-"))
    output = temporary / "hf"
    command = [sys.executable, "-m", "megatron_longalign.eval.export_worker"]
    command += [str(checkpoint), str(output)]
    if tokenizer is not None:
        command += ["--tokenizer", str(_tokenizer_dir(Path(tokenizer), temporary))]
    logger.info("exporting %s to %s", checkpoint, output)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(temporary, ignore_errors=True)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise ModelSourceError(f"cannot export checkpoint {checkpoint}: {reason}")
    source = ModelSource(output, temporary)
    try:
        check_hf_directory(output, what=f"the export of {checkpoint}")
    except ModelSourceError as err:
        source.close()
        raise ModelSourceError(f"{err}; pass --tokenizer DIR") from None
    return source


def _tokenizer_dir(tokenizer: Path, temporary: Path) -> Path:
    """A directory export can copy tokenizer files from (a bare sentencepiece model file
    is put into one)."""
    if tokenizer.is_dir():
        return tokenizer
    if not tokenizer.is_file():
        raise ModelSourceError(f"--tokenizer {tokenizer} does not exist")
    directory = temporary / "tokenizer"
    directory.mkdir()
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    return directory


def tokenizer_path(directory: Path, tokenizer: str | Path | None) -> str:
    """What data.tokenizer.load_tokenizer reads: --tokenizer, else the model directory."""
    return str(tokenizer) if tokenizer is not None else str(directory)


def choose_template(directory: Path | None, requested: str | None) -> ChatTemplate:
    """The trained template of `directory`, or `requested` (warned about if it differs)."""
    trained = exported_template(directory) if directory is not None else None
    if requested is not None:
        template = get_template(requested)
        if trained is not None and trained != requested:
            logger.warning(
                "--template %s differs from the template %s was trained with (%s): prompts "
                "will not look like training",
                requested,
                directory,
                trained,
            )
        return template
    if trained is None:
        where = directory if directory is not None else "the model"
        raise ModelSourceError(
            f"{where} names no training chat template (no longalign.json, and its "
            "tokenizer_config.json chat_template is none of ours): pass --template"
        )
    return get_template(trained)
