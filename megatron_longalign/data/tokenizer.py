"""Local tokenizers (sentencepiece `.model` files and Hugging Face tokenizer directories),
used exactly as at inference.

Train on what inference sees: a sample's token ids must equal what the tokenizer gives
for the rendered conversation when vLLM or transformers serve the model. So:
- special tokens come only from the chat template, by id; a special-token string inside
  user text stays plain text (a prompt cannot forge `<|im_end|>`);
- the text between two special tokens is encoded whole, with the tokenizer's own
  normaliser and prefix-space behaviour (sentencepiece's dummy prefix, Metaspace's
  `prepend_scheme`, byte-level BPE's regex), never piece by piece;
- where template scaffolding and contents meet inside such a text, token boundaries come
  from the tokenizer's own character offsets. A token that straddles two pieces belongs
  to the piece that holds its last character (e.g. Llama-2's `[/INST] ` + `Sure` is the
  one token `▁Sure`, which belongs to the answer and so is trained). A token without
  characters (sentencepiece's dummy `▁`) belongs to the piece at its position.

`encode_pieces` is the one entry point for templated samples; `encode` encodes plain text
as the tokenizer would at inference. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Markers that stand for template special tokens in the text handed to a Hugging Face
# tokenizer (see HFTokenizer). Supplementary private-use code points: no real text or
# vocabulary uses them, and a sample that does is refused rather than mis-tokenized.
_MARKER_BASE = 0xF0000
_MARKER_COUNT = 0xFFFE  # plane 15's private-use code points


class TokenizerError(ValueError):
    """The tokenizer path or its contents are unusable."""


class ReservedTextError(ValueError):
    """A sample contains text this tokenizer wrapper reserves for itself."""


def _anchors(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Each token's anchor: the offset of its last character, or its start when it has
    none. The anchor decides which piece a straddling token belongs to."""
    return np.where(ends > starts, ends - 1, starts)


class TextTokenizer:
    """Interface shared by the backends."""

    kind: str
    path: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    fingerprint: str = ""

    def encode(self, text: str) -> np.ndarray:
        """Plain text as the tokenizer encodes it at inference, special-token strings kept
        as text (int32 ids)."""
        raise NotImplementedError

    def encode_pieces(self, pieces: Sequence[str | int]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of `pieces` rendered in order, as at inference: an int is a special
        token's id, placed as is; consecutive strings form one text that is encoded
        whole. Returns `(ids, bounds)` with `len(bounds) == len(pieces) + 1`: piece i owns
        `ids[bounds[i]:bounds[i + 1]]` (the straddling rule is in the module docstring)."""
        raise NotImplementedError

    def is_special(self, token_id: int) -> bool:
        raise NotImplementedError

    def token_string(self, token_id: int) -> str:
        raise NotImplementedError

    def special_id(self, token: str) -> int | None:
        """Id of a special token given by its string, or None if the vocabulary lacks it."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with special tokens written as their strings."""
        raise NotImplementedError

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
            "encoding": "inference: text between special tokens encoded whole",
        }


class SentencePieceTokenizer(TextTokenizer):
    """A sentencepiece model used as is (dummy prefix, normaliser and whitespace rules
    included). Text between special tokens is one `encode` call, as in Llama-2's
    reference code and transformers' slow tokenizers.

    Piece offsets come from sentencepiece's own proto (byte offsets into the input). For
    models whose normaliser is the identity (Llama-2's), they are computed faster from
    the pieces' byte lengths, and checked against the input length: any disagreement
    (an unknown piece, say) falls back to the proto."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.path = str(model_file)
        blob = Path(model_file).read_bytes()
        self.fingerprint = _sha256(blob)
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(blob)
        except Exception as err:  # protobuf raises its own DecodeError type
            raise TokenizerError(f"{model_file} is not a sentencepiece model: {err}") from None
        if not proto.pieces:
            raise TokenizerError(f"{model_file} is not a sentencepiece model: it has no pieces")
        self._sp = spm.SentencePieceProcessor(model_proto=blob)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self._control = frozenset(i for i in range(self.vocab_size) if self._sp.is_control(i))
        self._ids = self._native_ids_encoder()
        normalizer = proto.normalizer_spec
        self._piece_bytes = self._decoded_piece_bytes(proto)
        self._lengths_are_offsets = (
            normalizer.name == "identity"
            and not normalizer.remove_extra_whitespaces
            and not proto.trainer_spec.treat_whitespace_as_suffix
            and self._piece_bytes is not None
        )

    def _native_ids_encoder(self):
        """sentencepiece's public `encode_as_ids` spends much of a short text's time in
        Python argument handling and builds a Python list for a long one. Its native
        ids-as-buffer binding is used when present and verified to agree with it."""
        public = self._sp.encode_as_ids
        native = getattr(getattr(self._sp, "_processor", None), "_EncodeAsBuffer", None)
        # (text, enable_sampling, nbest_size, alpha, add_bos, add_eos, reverse)
        options = (False, -1, 0.1, False, False, False)
        probes = ("Hello  world\n\n", "x<s>y", "東京 café 123", " ", "")
        if native is not None:
            try:
                if all(np.asarray(native(t, *options)).tolist() == public(t) for t in probes):
                    return lambda text: np.frombuffer(native(text, *options), dtype=np.int32)
            except (TypeError, RuntimeError, ValueError):
                pass
        return lambda text: np.asarray(public(text), dtype=np.int32)

    def _decoded_piece_bytes(self, proto) -> np.ndarray | None:
        """UTF-8 length of each piece's text ("▁" as one space; a byte piece is one
        byte). Pieces whose length in the input is not fixed (unknown, control) get a
        huge value, so a text holding one fails the length check and takes the proto."""
        never = 1 << 30  # summed in int64: one such piece exceeds any real text
        lengths = np.full(self.vocab_size, never, dtype=np.int32)
        for index, piece in enumerate(proto.pieces):
            if piece.type == piece.NORMAL or piece.type == piece.USER_DEFINED:
                if piece.type == piece.USER_DEFINED and "\u2581" in piece.piece:
                    return None  # matched in the escaped text: no fixed input length
                lengths[index] = len(piece.piece.replace("\u2581", " ").encode("utf-8"))
            elif piece.type == piece.BYTE:
                lengths[index] = 1
        return lengths

    def encode(self, text: str) -> np.ndarray:
        return self._ids(text)

    def _encode_with_cuts(self, text: str, positions: list[int]) -> tuple[np.ndarray, list[int]]:
        """ids of `text`, and for each byte offset in `positions` the number of tokens
        whose anchor lies before it (where a piece starting there begins)."""
        fast = self._fast_token_ends(text)
        if fast is None:
            ids, anchors = self._encode_with_proto(text)
            return ids, np.searchsorted(anchors, positions, "left").tolist()
        ids, ends = fast
        cuts = np.searchsorted(ends, positions, "left").tolist()
        for index, (position, cut) in enumerate(zip(positions, cuts, strict=True)):
            # Tokens ending before `position` are all before it. Of those ending exactly
            # there, the first has characters (its last byte is before `position`); any
            # after it are empty and sit at `position`.
            start = ends[cut - 1] if cut else 0
            if cut < ends.size and ends[cut] == position and start < position:
                cuts[index] = cut + 1
        return ids, cuts

    def _fast_token_ends(self, text: str) -> tuple[np.ndarray, np.ndarray] | None:
        """ids and each token's end as a byte offset, from the pieces' lengths; None when
        the model normalises or the lengths do not add up (take the proto then)."""
        if not self._lengths_are_offsets:
            return None
        ids = self._ids(text)
        if not ids.size:
            return (ids, np.zeros(0, dtype=np.int64)) if not text.strip() else None
        ends = np.cumsum(self._piece_bytes[ids], dtype=np.int64)
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        extra = int(ends[-1]) - size
        if extra == 0:
            return ids, ends
        # The dummy prefix is the only text sentencepiece adds: one "▁" in front.
        if extra == 1 and self._sp.id_to_piece(int(ids[0])).startswith("\u2581"):
            ends -= 1
            return ids, ends
        return None

    def _encode_with_proto(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        from sentencepiece import sentencepiece_pb2

        try:
            serialized = self._sp.encode(text, out_type="serialized_proto")
        except (TypeError, ValueError):  # releases before `out_type="serialized_proto"`
            serialized = self._sp.EncodeAsSerializedProto(text)
        result = sentencepiece_pb2.SentencePieceText.FromString(serialized)
        count = len(result.pieces)
        ids = np.fromiter((p.id for p in result.pieces), dtype=np.int32, count=count)
        starts = np.fromiter((p.begin for p in result.pieces), dtype=np.int64, count=count)
        ends = np.fromiter((p.end for p in result.pieces), dtype=np.int64, count=count)
        return ids, _anchors(starts, ends)

    def encode_pieces(self, pieces: Sequence[str | int]) -> tuple[np.ndarray, np.ndarray]:
        # Plain Python for the bookkeeping: a sample has a handful of pieces, and numpy's
        # per-call cost would dominate short chats.
        parts: list[np.ndarray] = []
        bounds = [0]  # bounds[-1] is the number of tokens so far
        run: list[str] = []  # the texts since the last special token

        def encode_run() -> None:
            if not run:
                return
            positions = []
            position = 0
            for text in run[:-1]:
                position += len(text) if text.isascii() else len(text.encode("utf-8"))
                positions.append(position)
            ids, cuts = self._encode_with_cuts("".join(run), positions)
            total = bounds[-1]
            bounds.extend(total + cut for cut in cuts)
            bounds.append(total + ids.size)  # every token belongs to a piece of the run
            parts.append(ids)
            run.clear()

        for piece in pieces:
            if isinstance(piece, str):
                run.append(piece)
                continue
            encode_run()
            parts.append(np.array([piece], dtype=np.int32))
            bounds.append(bounds[-1] + 1)
        encode_run()
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return ids.astype(np.int32, copy=False), np.asarray(bounds, dtype=np.int64)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._control

    def token_string(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def special_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        if token_id == self._sp.unk_id() or self._sp.id_to_piece(token_id) != token:
            return None
        return token_id

    def decode(self, ids: Sequence[int]) -> str:
        # Text runs are decoded one by one, as they were encoded: each run's dummy
        # prefix is dropped again.
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if self.is_special(token_id):
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self.token_string(token_id))
            else:
                run.append(token_id)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)


class HFTokenizer(TextTokenizer):
    """A Hugging Face `tokenizer.json` (+ `tokenizer_config.json`) directory.

    A sample is encoded in one call on its rendered text, which is what inference does.
    Only one thing differs: each template special token is written as a private marker
    that a copy of the tokenizer knows as an ordinary added token (with the special
    token's own strip/normalise flags), while the real special tokens are not matched in
    text. So the text between specials is split, normalised and pre-tokenized exactly as
    around the real special token, and a forged `<|im_end|>` in user text stays text."""

    kind = "hf"

    def __init__(self, directory: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        directory = Path(directory)
        self.path = str(directory)
        self.fingerprint = _hf_fingerprint(directory)
        try:
            self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as err:  # the Rust side raises a generic Exception
            raise TokenizerError(f"cannot load {directory / 'tokenizer.json'}: {err}") from None
        # Inference encodes whole prompts: no truncation or padding a tokenizer.json may
        # carry, and no post-processor (with add_special_tokens=False it only trims
        # offsets, and the straddling rule needs the untrimmed ones).
        self._tok.no_truncation()
        self._tok.no_padding()
        self._tok.post_processor = None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        self._special = frozenset(token_id for token_id, token in added.items() if token.special)
        config = _read_special_token_config(directory)
        self.bos_id = self._configured_id(config.get("bos_token"), "bos_token")
        self.eos_id = self._configured_id(config.get("eos_token"), "eos_token")
        self._marked = self._marked_copy(added)

    def _configured_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.path}: {field} {token!r} is not in the vocabulary")
        return token_id

    def _marked_copy(self, added: dict) -> tuple[Any, dict[int, str], np.ndarray]:
        """(tokenizer copy, special id -> marker string, marker id -> special id map)."""
        from tokenizers import AddedToken, Tokenizer

        copy = Tokenizer.from_str(self._tok.to_str())
        copy.encode_special_tokens = True  # real special tokens are text now
        markers: dict[int, str] = {}
        new_tokens = []
        specials = sorted(self._special | ({self.bos_id, self.eos_id} - {None}))
        if len(specials) > _MARKER_COUNT:
            raise TokenizerError(f"{self.path}: more than {_MARKER_COUNT} special tokens")
        for offset, token_id in enumerate(specials):
            token = added.get(token_id)
            marker = chr(_MARKER_BASE + offset)
            markers[token_id] = marker
            new_tokens.append(
                AddedToken(
                    marker,
                    single_word=bool(token and token.single_word),
                    lstrip=bool(token and token.lstrip),
                    rstrip=bool(token and token.rstrip),
                    normalized=bool(token and token.normalized),
                    special=False,
                )
            )
        copy.add_tokens(new_tokens)
        remap = np.arange(copy.get_vocab_size(with_added_tokens=True), dtype=np.int32)
        for token_id, marker in markers.items():
            marker_id = copy.token_to_id(marker)
            if marker_id is None:
                raise TokenizerError(f"{self.path}: cannot register the marker for id {token_id}")
            remap[marker_id] = token_id
        # Added last, so the markers have the largest ids of the copy.
        self._first_marker_id = min(
            (copy.token_to_id(m) for m in markers.values()), default=remap.size
        )
        # A special token flagged `normalized` is matched in normalised text; if the
        # normaliser rewrites it (Prepend("▁")), inference cannot produce it either.
        self._unplaceable = {
            token_id: self._tok.id_to_token(token_id)
            for token_id, marker in markers.items()
            if copy.encode(f"x{marker}x", add_special_tokens=False).ids.count(
                copy.token_to_id(marker)
            )
            != 1
        }
        return copy, markers, remap

    def encode(self, text: str) -> np.ndarray:
        ids, _ = self.encode_pieces([text])
        return ids

    def encode_pieces(self, pieces: Sequence[str | int]) -> tuple[np.ndarray, np.ndarray]:
        copy, markers, remap = self._marked
        texts = []
        specials = 0
        for piece in pieces:
            if isinstance(piece, str):
                texts.append(piece)
            else:
                specials += 1
                marker = markers.get(int(piece))
                if marker is None:
                    raise ValueError(f"{self.path}: token id {piece} is not a special token")
                if int(piece) in self._unplaceable:
                    raise TokenizerError(
                        f"{self.path}/tokenizer.json: the special token "
                        f'{self._unplaceable[int(piece)]!r} is marked "normalized": true and '
                        "the normaliser rewrites it, so a rendered prompt never contains it, "
                        'at inference either; set "normalized": false for it in '
                        "tokenizer.json"
                    )
                texts.append(marker)
        text = "".join(texts)
        encoding = copy.encode(text, add_special_tokens=False)
        raw = np.asarray(encoding.ids, dtype=np.int64)
        if int((raw >= self._first_marker_id).sum()) != specials:
            raise ReservedTextError(
                f"the text contains a character from U+{_MARKER_BASE:X}..U+"
                f"{_MARKER_BASE + _MARKER_COUNT - 1:X}, which this tokenizer wrapper reserves "
                "to mark special tokens"
            )
        ids = remap[raw]
        bounds = [0]
        position = 0
        for text in texts[:-1]:
            position += len(text)
            bounds.append(_first_token_at(encoding, bounds[-1], ids.size, position))
        bounds.append(ids.size)
        return ids, np.asarray(bounds, dtype=np.int64)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def token_string(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def special_id(self, token: str) -> int | None:
        token_id = self._tok.token_to_id(token)
        return token_id if token_id is not None and token_id in self._special else None

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _first_token_at(encoding, low: int, count: int, char: int) -> int:
    """The number of tokens whose anchor is before character `char`, knowing it is at
    least `low` (binary search over the encoding's offsets: converting all of them to
    Python would double the cost of a long sample)."""
    high = count
    while low < high:
        middle = (low + high) // 2
        start, end = encoding.token_to_chars(middle)
        anchor = end - 1 if end > start else start
        if anchor < char:
            low = middle + 1
        else:
            high = middle
    return low


def _resolve(path: str | os.PathLike) -> tuple[str, Path]:
    """Which tokenizer `path` names: ("sentencepiece", model file) or ("hf", directory).
    A directory with both files is read as Hugging Face (tokenizer.json)."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer path {path} does not exist")
    if path.is_file():
        return "sentencepiece", path
    if (path / "tokenizer.json").is_file():
        return "hf", path
    if (path / "tokenizer.model").is_file():
        return "sentencepiece", path / "tokenizer.model"
    raise TokenizerError(
        f"{path} has neither tokenizer.json (Hugging Face) nor tokenizer.model (sentencepiece)"
    )


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """A sentencepiece `.model` file, or a local HF tokenizer directory."""
    kind, resolved = _resolve(path)
    return HFTokenizer(resolved) if kind == "hf" else SentencePieceTokenizer(resolved)


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """`load_tokenizer(path).fingerprint` (what a preprocessed set records as
    `tokenizer.sha256`), from the files alone, without building the tokenizer: the one
    definition a model's tokenizer and a data set's are compared by."""
    kind, resolved = _resolve(path)
    return _hf_fingerprint(resolved) if kind == "hf" else _sha256(resolved.read_bytes())


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


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _hf_fingerprint(directory: Path) -> str:
    """The files that define a Hugging Face tokenizer's encoding and special tokens."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    return _hash_files([directory / name for name in names if (directory / name).is_file()])


def _hash_files(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
