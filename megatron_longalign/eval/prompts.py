"""Prompts for generation, rendered and tokenized as in training.

A request's prompt is the user message (task instructions plus a long document). It is
middle-truncated to `max_length` tokens as LongAlign's prediction scripts do (tokenize
the message, keep the first and last halves, decode each, join), then put into the
training chat template's generation prompt (`ChatTemplate.prompt_pieces`, which is what
the exported Jinja renders with add_generation_prompt=True) and tokenized by the
training rules: special tokens by id, the text between them encoded whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_longalign.data.conversation import ASSISTANT, USER, Conversation, Turn
from megatron_longalign.data.encoding import SampleEncoder, TemplateTokenizerMismatch
from megatron_longalign.data.templates import BOS, EOS, ChatTemplate, RegionKind
from megatron_longalign.data.tokenizer import TextTokenizer


def middle_truncate(ids: Sequence[int], max_length: int) -> list[int]:
    """`ids` if it fits, else its first ceil(max_length / 2) and last floor(max_length / 2)
    ids: exactly `max_length` kept, the middle dropped."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    tail = max_length // 2
    return ids[: max_length - tail] + ids[len(ids) - tail :]


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # the rendered generation prompt's token ids
    user_text: str  # the (truncated) user message inside it
    truncated_tokens: int  # user-message tokens dropped by middle truncation


class PromptBuilder:
    """Training template + tokenizer -> generation prompts, and the ids that end an answer."""

    def __init__(self, tokenizer: TextTokenizer, template: ChatTemplate | None) -> None:
        """template None: truncation only (a server renders the template)."""
        if template is not None:
            # Fails here, once, when the tokenizer lacks a special token the template needs.
            SampleEncoder(tokenizer, template)
        self.tokenizer = tokenizer
        self.template = template
        self.stop_ids = self._stop_ids() if template is not None else []

    def _special_id(self, special: str) -> int:
        tok = self.tokenizer
        token_id = {BOS: tok.bos_id, EOS: tok.eos_id}.get(special)
        if special not in (BOS, EOS):
            token_id = tok.special_id(special)
        if token_id is None:  # SampleEncoder checked every special of the template
            raise TemplateTokenizerMismatch(f"{tok.path} lacks {special!r}")
        return token_id

    def _stop_ids(self) -> list[int]:
        """The special token that closes an answer in this template, and EOS: where
        generation stops."""
        probe = Conversation((Turn(USER, "u"), Turn(ASSISTANT, "a")))
        ends = [
            self._special_id(p.special)
            for p in self.template.pieces(probe)
            if p.special is not None and p.kind == RegionKind.ASSISTANT
        ]
        if self.tokenizer.eos_id is not None:
            ends.append(self.tokenizer.eos_id)
        return list(dict.fromkeys(ends))

    def truncate(self, text: str, max_length: int | None) -> tuple[str, int]:
        """(user text, tokens dropped): middle truncation of the message's tokens."""
        if max_length is None:
            return text, 0
        ids = self.tokenizer.encode(text).tolist()
        if len(ids) <= max_length:
            return text, 0
        kept = middle_truncate(ids, max_length)
        head = max_length - max_length // 2
        joined = self.tokenizer.decode(kept[:head]) + self.tokenizer.decode(kept[head:])
        return joined, len(ids) - max_length

    def prompt_ids(self, user_text: str) -> list[int]:
        if self.template is None:
            raise ValueError("this PromptBuilder has no template")
        pieces = self.template.prompt_pieces(Conversation((Turn(USER, user_text),)))
        items = [p.text if p.special is None else self._special_id(p.special) for p in pieces]
        ids, _ = self.tokenizer.encode_pieces(items)
        return ids.tolist()

    def raw_ids(self, text: str) -> list[int]:
        """A prompt without the chat template: BOS (when the tokenizer has one) + text."""
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        return bos + self.tokenizer.encode(text).tolist()

    def build(self, text: str, max_length: int | None, raw: bool = False) -> Prompt:
        user_text, dropped = self.truncate(text, max_length)
        ids = self.raw_ids(user_text) if raw else self.prompt_ids(user_text)
        return Prompt(ids, user_text, dropped)

    def answer_text(self, ids: Sequence[int]) -> tuple[str, int]:
        """(text, completion tokens) of generated ids: cut at the first stop id (which
        counts as generated), decoded without special tokens (as servers do by default),
        surrounding whitespace stripped."""
        ids = [int(i) for i in ids]
        stops = set(self.stop_ids)
        end = next((i for i, token in enumerate(ids) if token in stops), None)
        count = len(ids) if end is None else end + 1
        body = [i for i in (ids if end is None else ids[:end]) if not self.tokenizer.is_special(i)]
        return self.tokenizer.decode(body).strip(), count
