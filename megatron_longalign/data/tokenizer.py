"""Local tokenizers (sentencepiece `.model` files and Hugging Face tokenizer directories).

Chat templates are tokenized piece by piece so that loss-mask boundaries always fall on
token boundaries. That only works if encoding is *concatenation-safe*:
``decode(encode(a) + encode(b)) == a + b``. Two things usually break it and are
neutralised here:
- a dummy/prepended "▁" that sentencepiece-style tokenizers add to every encode call;
- special-token strings inside user text being matched as control tokens (a prompt could
  otherwise forge ``<|im_end|>``). Special tokens are only ever emitted by templates, by id.

Nothing here touches the network: files are read from disk only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# A private-use character: it has no merges in any real vocabulary (it is byte-fallback
# or unknown), so encoding SENTINEL + text never changes the text's own tokens.
_SENTINEL = "\ue000"


class TokenizerError(ValueError):
    """The tokenizer path or its contents are unusable."""


class TextTokenizer:
    """Interface shared by the backends. Ids are plain Python ints."""

    kind: str
    path: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Concatenation-safe encoding of plain text (never yields special tokens)."""
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array (backends may produce it without a Python list)."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def is_special(self, token_id: int) -> bool:
        raise NotImplementedError

    def token_string(self, token_id: int) -> str:
        raise NotImplementedError

    def special_id(self, token: str) -> int | None:
        """Id of a special token given by its string, or None if the vocabulary lacks it."""
        raise NotImplementedError

    def _decode_text(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of encoding: text runs decoded, special tokens written as their strings."""
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if self.is_special(token_id):
                if run:
                    parts.append(self._decode_text(run))
                    run = []
                parts.append(self.token_string(token_id))
            else:
                run.append(token_id)
        if run:
            parts.append(self._decode_text(run))
        return "".join(parts)

    def _is_concatenation_safe(self) -> bool:
        pieces = ("Hello", " world", "\n\nx", "y")
        ids = [i for piece in pieces for i in self.encode(piece)]
        return self._decode_text(ids) == "".join(pieces)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "sha256": self.fingerprint,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "bos_token": None if self.bos_id is None else self.token_string(self.bos_id),
            "eos_token": None if self.eos_id is None else self.token_string(self.eos_id),
            "adjustments": self.adjustments,
        }

    fingerprint: str = ""
    # What this wrapper changed relative to the tokenizer's own defaults, for the record.
    adjustments: list[str]


class SentencePieceTokenizer(TextTokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.path = str(model_file)
        blob = Path(model_file).read_bytes()
        self.fingerprint = hashlib.sha256(blob).hexdigest()
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(blob)
        except Exception as err:  # protobuf raises its own DecodeError type
            raise TokenizerError(f"{model_file} is not a sentencepiece model: {err}") from None
        self.adjustments = []
        # The dummy prefix adds "▁" at the start of every encode call and stripping extra
        # whitespace eats the spaces templates rely on; both break piecewise encoding.
        if proto.normalizer_spec.add_dummy_prefix:
            proto.normalizer_spec.add_dummy_prefix = False
            self.adjustments.append("disabled add_dummy_prefix")
        if proto.normalizer_spec.remove_extra_whitespaces:
            proto.normalizer_spec.remove_extra_whitespaces = False
            self.adjustments.append("disabled remove_extra_whitespaces")
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self._control = frozenset(i for i in range(self.vocab_size) if self._sp.is_control(i))
        self._encode_buffer = None
        self._native_encoders()
        if not self._is_concatenation_safe():
            raise TokenizerError(
                f"{model_file}: encoding is not concatenation-safe (its normaliser rewrites "
                "text), so loss masks cannot be aligned to template pieces"
            )

    def _native_encoders(self) -> None:
        """sentencepiece's public `encode_as_ids` spends a large share of a short piece's
        time in Python argument handling, and building a Python list for a long one. Its
        native bindings (ids, and ids as a buffer) are used directly when present and
        verified to agree with the public call; otherwise the public call."""
        public = self._sp.encode_as_ids
        processor = getattr(self._sp, "_processor", None)
        as_ids = getattr(processor, "_EncodeAsIds", None)
        as_buffer = getattr(processor, "_EncodeAsBuffer", None)
        # (text, enable_sampling, nbest_size, alpha, add_bos, add_eos, reverse)
        options = (False, -1, 0.1, False, False, False)
        probes = ("Hello  world\n\n", "x<s>y", "東京 café 123", " ", "")
        self._encode = public
        try:
            if as_ids is not None and all(as_ids(t, *options) == public(t) for t in probes):
                self._encode = lambda text: as_ids(text, *options)
            if as_buffer is not None and all(
                np.asarray(as_buffer(t, *options)).tolist() == public(t) for t in probes
            ):
                self._encode_buffer = lambda text: np.asarray(as_buffer(text, *options))
        except (TypeError, RuntimeError, ValueError):
            self._encode = public

    def encode_array(self, text: str) -> np.ndarray:
        if self._encode_buffer is not None:
            return self._encode_buffer(text)
        return np.asarray(self._encode(text), dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._control

    def token_string(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def special_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        if token_id == self._sp.unk_id() or self._sp.id_to_piece(token_id) != token:
            return None
        return token_id

    def _decode_text(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer(TextTokenizer):
    """A Hugging Face `tokenizer.json` (+ `tokenizer_config.json`) directory."""

    kind = "hf"

    def __init__(self, directory: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        directory = Path(directory)
        self.path = str(directory)
        files = [
            directory / name
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
            if (directory / name).is_file()
        ]
        self.fingerprint = _hash_files(files)
        try:
            self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as err:  # the Rust side raises a generic Exception
            raise TokenizerError(f"cannot load {directory / 'tokenizer.json'}: {err}") from None
        self.adjustments = []
        # Special-token strings inside user text must stay text (see module docstring).
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._special = frozenset(
            token_id
            for token_id, added in self._tok.get_added_tokens_decoder().items()
            if added.special
        )
        config = _read_special_token_config(directory)
        self.bos_id = self._configured_id(config.get("bos_token"), "bos_token")
        self.eos_id = self._configured_id(config.get("eos_token"), "eos_token")
        self._strip_prefix_ids: list[int] = []
        self._sentinel_decode_ids: list[int] = []
        self._make_concatenation_safe()

    def _configured_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.path}: {field} {token!r} is not in the vocabulary")
        return token_id

    def _raw_encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _make_concatenation_safe(self) -> None:
        if self._is_concatenation_safe():
            return
        # Metaspace-style tokenizers prepend "▁" on every call and strip it when decoding.
        # Encoding SENTINEL+text and dropping SENTINEL's ids keeps the text's own tokens.
        self._strip_prefix_ids = self._raw_encode(_SENTINEL)
        self._sentinel_decode_ids = self._strip_prefix_ids
        if not self._is_concatenation_safe():
            raise TokenizerError(
                f"{self.path}: this tokenizer is not concatenation-safe even with a sentinel "
                "prefix, so loss masks cannot be aligned to template pieces"
            )
        self.adjustments.append("strips the per-call prefix space via a sentinel character")

    def encode(self, text: str) -> list[int]:
        if not self._strip_prefix_ids:
            return self._raw_encode(text)
        ids = self._raw_encode(_SENTINEL + text)
        prefix = self._strip_prefix_ids
        if ids[: len(prefix)] != prefix:
            raise TokenizerError(f"{self.path}: sentinel prefix merged with text {text[:20]!r}")
        return ids[len(prefix) :]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def token_string(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def special_id(self, token: str) -> int | None:
        token_id = self._tok.token_to_id(token)
        return token_id if token_id is not None and token_id in self._special else None

    def _decode_text(self, ids: Sequence[int]) -> str:
        prefix = self._sentinel_decode_ids
        text = self._tok.decode(prefix + list(ids), skip_special_tokens=False)
        if prefix:
            return text[len(_SENTINEL) :] if text.startswith(_SENTINEL) else text
        return text


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """A sentencepiece `.model` file, or a local HF tokenizer directory."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer path {path} does not exist")
    if path.is_file():
        return SentencePieceTokenizer(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model")
    raise TokenizerError(
        f"{path} has neither tokenizer.json (Hugging Face) nor tokenizer.model (sentencepiece)"
    )


def _read_special_token_config(directory: Path) -> dict[str, str | None]:
    """bos/eos token strings from tokenizer_config.json, falling back to
    special_tokens_map.json; values may be plain strings or {"content": ...} objects."""
    found: dict[str, str | None] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{file}: {err}") from None
        for key in ("bos_token", "eos_token"):
            if key in data:
                value = data[key]
                found[key] = value.get("content") if isinstance(value, dict) else value
    return found


def _hash_files(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
