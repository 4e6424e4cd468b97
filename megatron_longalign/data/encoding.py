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
    """Conversation -> token ids + typed regions, tokenized as at inference (the rules
    are in data/tokenizer.py): the template's pieces are rendered in order, specials by
    id, and the text between two specials is encoded whole. Each piece's tokens follow
    from the tokenizer's character offsets; its kind becomes the tokens' region."""

    def __init__(self, tokenizer: TextTokenizer, template: ChatTemplate) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self._special_ids: dict[str, int] = {}
        for piece in template.pieces(_PROBE):
            if piece.special is not None:
                self._special_ids[piece.special] = self._resolve(piece.special)
        self.encode(_PROBE)  # a tokenizer that cannot encode this template fails here, once

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
        """The conversation as the text an inference server renders for the model."""
        return "".join(self.piece_text(p) for p in self.template.pieces(conversation))

    def encode(self, conversation: Conversation) -> EncodedSample:
        pieces = self.template.pieces(conversation)
        items = [p.text if p.special is None else self._special_ids[p.special] for p in pieces]
        tokens, bounds = self.tokenizer.encode_pieces(items)
        regions, targets = regions_from_bounds(bounds.tolist(), [int(p.kind) for p in pieces])
        return EncodedSample(tokens.astype(TOKEN_DTYPE, copy=False), regions, targets)


def regions_from_bounds(bounds: list[int], kinds: list[int]) -> tuple[np.ndarray, int]:
    """(R, 3) regions from per-piece token bounds and kinds (empty pieces dropped,
    adjacent pieces of one kind merged), and the number of target tokens. Plain Python:
    a sample has a handful of pieces."""
    regions: list[list[int]] = []
    targets = 0
    for index, kind in enumerate(kinds):
        start, end = bounds[index], bounds[index + 1]
        if end == start:
            continue
        if kind == RegionKind.ASSISTANT:
            targets += end - start
        if regions and regions[-1][2] == kind:
            regions[-1][1] = end
        else:
            regions.append([start, end, kind])
    return np.array(regions, dtype=REGION_DTYPE).reshape(-1, 3), targets
