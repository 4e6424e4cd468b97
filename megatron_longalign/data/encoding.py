"""Tokenize a templated conversation into token ids plus typed regions.

`regions` is an int32 array of shape (R, 3): rows (start, end, kind) that tile the
sample's tokens in order, with adjacent pieces of the same kind merged. The loss mask is
the union of ASSISTANT regions; nothing else is stored, so masks, turn boundaries and
context/question boundaries all come from one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_longalign.data.conversation import Conversation, Turn
from megatron_longalign.data.templates import BOS, EOS, ChatTemplate, Piece, RegionKind
from megatron_longalign.data.tokenizer import TextTokenizer

TOKEN_DTYPE = np.int32
REGION_DTYPE = np.int32


class TemplateTokenizerMismatch(ValueError):
    """The template needs a special token that the tokenizer does not have."""


@dataclass
class EncodedSample:
    tokens: np.ndarray  # (T,) TOKEN_DTYPE
    regions: np.ndarray  # (R, 3) REGION_DTYPE rows of (start, end, kind)
    num_targets: int = -1  # computed from regions when not given

    def __post_init__(self) -> None:
        if self.num_targets < 0:
            self.num_targets = target_token_count(self.regions)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def target_token_count(regions: np.ndarray) -> int:
    assistant = regions[regions[:, 2] == RegionKind.ASSISTANT]
    return int((assistant[:, 1] - assistant[:, 0]).sum())


def loss_mask_from_regions(regions: np.ndarray, length: int) -> np.ndarray:
    """bool (length,) mask of target tokens."""
    mask = np.zeros(length, dtype=bool)
    for start, end, kind in regions.tolist():
        if kind == RegionKind.ASSISTANT:
            mask[start:end] = True
    return mask


_SCAFFOLDING_CACHE_SIZE = 4096  # bounds memory if a template emits varying text (Round N)

# Every role and turn position, so start-up validation sees every special token used.
_PROBE = Conversation(
    (
        Turn("system", "s"),
        Turn("user", "u"),
        Turn("assistant", "a"),
        Turn("user", "c\n\nq"),
        Turn("assistant", "b"),
    )
)


class SampleEncoder:
    def __init__(self, tokenizer: TextTokenizer, template: ChatTemplate) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self._special_ids: dict[str, int] = {}
        for piece in template.pieces(_PROBE):
            if piece.special is not None:
                self._special_ids[piece.special] = self._resolve(piece.special)
        # Template scaffolding is a handful of constant strings; encoding them once halves
        # the tokenizer calls for short chats, where per-call overhead dominates.
        self._scaffolding_cache: dict[str, np.ndarray] = {}
        self._special_arrays = {
            special: np.array([token_id], dtype=TOKEN_DTYPE)
            for special, token_id in self._special_ids.items()
        }

    def _resolve(self, special: str) -> int:
        tok = self.tokenizer
        if special in (BOS, EOS):
            token_id = tok.bos_id if special == BOS else tok.eos_id
            what = "a BOS token" if special == BOS else "an EOS token"
        else:
            token_id = tok.special_id(special)
            what = f"the special token {special!r}"
        if token_id is None:
            raise TemplateTokenizerMismatch(
                f"template {self.template.name!r} needs {what}, which tokenizer {tok.path} "
                "does not define; pick a template that matches the tokenizer"
            )
        return token_id

    def piece_text(self, piece: Piece) -> str:
        """The text a piece stands for (special tokens as their strings)."""
        if piece.special is None:
            return piece.text
        return self.tokenizer.token_string(self._special_ids[piece.special])

    def render(self, conversation: Conversation) -> str:
        return "".join(self.piece_text(p) for p in self.template.pieces(conversation))

    def encode(self, conversation: Conversation) -> EncodedSample:
        parts: list[np.ndarray] = []
        regions: list[list[int]] = []
        targets = 0
        end = 0
        encode_text = self.tokenizer.encode_array
        scaffolding = self._scaffolding_cache
        for piece in self.template.pieces(conversation):
            if piece.special is not None:
                part = self._special_arrays[piece.special]
            elif piece.kind == RegionKind.TEMPLATE:
                part = scaffolding.get(piece.text)
                if part is None:
                    part = encode_text(piece.text)
                    if len(scaffolding) < _SCAFFOLDING_CACHE_SIZE:
                        scaffolding[piece.text] = part
            else:
                part = encode_text(piece.text)
            if not part.size:
                continue
            parts.append(part)
            start, end = end, end + part.size
            if piece.kind == RegionKind.ASSISTANT:
                targets += part.size
            if regions and regions[-1][2] == piece.kind:
                regions[-1][1] = end
            else:
                regions.append([start, end, int(piece.kind)])
        tokens = np.concatenate(parts).astype(TOKEN_DTYPE, copy=False)
        return EncodedSample(tokens, np.asarray(regions, dtype=REGION_DTYPE), targets)
