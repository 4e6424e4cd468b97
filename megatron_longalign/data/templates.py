"""Chat templates: a `Conversation` becomes a list of typed pieces.

A piece is either plain text or one special token (by its string, or the aliases
BOS/EOS that resolve to the tokenizer's own begin/end-of-sequence tokens). Each piece
carries a `RegionKind`; the loss mask is exactly the ASSISTANT regions, i.e. every
assistant content plus the end-of-turn token that closes it. Template scaffolding, system
and user text are never targets. Where a template closes every turn with a special token
(llama3, chatml), that token belongs to its turn's region, so a turn boundary is always
at the start of the next turn's header.

User content is split at its last paragraph break ("\n\n") into CONTEXT + USER so that
later stages (SkipAlign) know where a long context ends and the question starts. Both
pieces are still prompt, never target. Pieces only mark where regions start: the text
between two special tokens is tokenized whole, as at inference (data/tokenizer.py), and
a token that straddles two pieces belongs to the piece of its last character.

Contents are used verbatim (no stripping): the rendering is what a server renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from megatron_longalign.data.conversation import ASSISTANT, SYSTEM, Conversation

BOS = "<<bos>>"
EOS = "<<eos>>"


class RegionKind(IntEnum):
    TEMPLATE = 0
    SYSTEM = 1
    USER = 2
    ASSISTANT = 3
    CONTEXT = 4  # the part of a user turn before its last "\n\n" (e.g. a long document)


@dataclass(frozen=True)
class Piece:
    kind: RegionKind
    text: str = ""
    special: str | None = None  # a special token's string, or BOS / EOS


def _t(text: str) -> Piece:
    return Piece(RegionKind.TEMPLATE, text)


def _special(token: str, kind: RegionKind = RegionKind.TEMPLATE) -> Piece:
    return Piece(kind, special=token)


def user_pieces(content: str) -> list[Piece]:
    cut = content.rfind("\n\n")
    if cut > 0 and content[cut + 2 :].strip():
        context, question = content[: cut + 2], content[cut + 2 :]
        return [Piece(RegionKind.CONTEXT, context), Piece(RegionKind.USER, question)]
    return [Piece(RegionKind.USER, content)]


def _answer(content: str, end_token: str) -> list[Piece]:
    return [Piece(RegionKind.ASSISTANT, content), _special(end_token, RegionKind.ASSISTANT)]


class ChatTemplate:
    name: str = ""
    description: str = ""  # the rendered shape, for P.json and --help

    def pieces(self, conversation: Conversation) -> list[Piece]:
        raise NotImplementedError


class Llama2Template(ChatTemplate):
    name = "llama2"
    description = "<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer}</s>"

    def pieces(self, conversation: Conversation) -> list[Piece]:
        out: list[Piece] = []
        for index, (user, answer) in enumerate(conversation.rounds()):
            out += [_special(BOS), _t("[INST] ")]
            if index == 0 and conversation.system is not None:
                out += [_t("<<SYS>>\n"), Piece(RegionKind.SYSTEM, conversation.system)]
                out.append(_t("\n<</SYS>>\n\n"))
            out += user_pieces(user) + [_t(" [/INST] ")] + _answer(answer, EOS)
        return out


class Llama3Template(ChatTemplate):
    name = "llama3"
    description = (
        "<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>..."
    )

    def pieces(self, conversation: Conversation) -> list[Piece]:
        out = [_special("<|begin_of_text|>")]
        for turn in conversation.turns:
            out += [_special("<|start_header_id|>"), _t(turn.role), _special("<|end_header_id|>")]
            out.append(_t("\n\n"))
            if turn.role == ASSISTANT:
                out += _answer(turn.content, "<|eot_id|>")
            elif turn.role == SYSTEM:
                out += [
                    Piece(RegionKind.SYSTEM, turn.content),
                    _special("<|eot_id|>", RegionKind.SYSTEM),
                ]
            else:
                out += user_pieces(turn.content) + [_special("<|eot_id|>", RegionKind.USER)]
        return out


class ChatMLTemplate(ChatTemplate):
    name = "chatml"
    description = "<|im_start|>{role}\\n{content}<|im_end|>\\n... (Qwen)"

    def pieces(self, conversation: Conversation) -> list[Piece]:
        out: list[Piece] = []
        for turn in conversation.turns:
            out += [_special("<|im_start|>"), _t(turn.role + "\n")]
            if turn.role == ASSISTANT:
                out += _answer(turn.content, "<|im_end|>")
            elif turn.role == SYSTEM:
                out += [
                    Piece(RegionKind.SYSTEM, turn.content),
                    _special("<|im_end|>", RegionKind.SYSTEM),
                ]
            else:
                out += user_pieces(turn.content) + [_special("<|im_end|>", RegionKind.USER)]
            out.append(_t("\n"))
        return out


class ChatGLMTemplate(ChatTemplate):
    """LongAlign's ChatGLM prompt; a system prompt, if any, precedes the first round."""

    name = "chatglm"
    description = "{system}\\n\\n[Round 1]\\n\\n问：{user}\\n\\n答：{answer}</s>\\n\\n[Round 2]..."

    def pieces(self, conversation: Conversation) -> list[Piece]:
        out: list[Piece] = []
        if conversation.system is not None:
            out += [Piece(RegionKind.SYSTEM, conversation.system), _t("\n\n")]
        for index, (user, answer) in enumerate(conversation.rounds()):
            if index:
                out.append(_t("\n\n"))
            out.append(_t(f"[Round {index + 1}]\n\n问："))
            out += user_pieces(user) + [_t("\n\n答：")] + _answer(answer, EOS)
        return out


class PlainTemplate(ChatTemplate):
    name = "plain"
    description = "<s>{system}\\n\\n{user}\\n\\n{answer}</s>{user}\\n\\n{answer}</s>"

    def pieces(self, conversation: Conversation) -> list[Piece]:
        out = [_special(BOS)]
        if conversation.system is not None:
            out += [Piece(RegionKind.SYSTEM, conversation.system), _t("\n\n")]
        for user, answer in conversation.rounds():
            out += user_pieces(user) + [_t("\n\n")] + _answer(answer, EOS)
        return out


TEMPLATES: dict[str, ChatTemplate] = {
    template.name: template
    for template in (
        Llama2Template(),
        Llama3Template(),
        ChatMLTemplate(),
        ChatGLMTemplate(),
        PlainTemplate(),
    )
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}") from None
