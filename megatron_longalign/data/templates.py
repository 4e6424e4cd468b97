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

Each template also carries `jinja`: the same rendering as a Hugging Face chat template
(exported into tokenizer_config.json, so transformers, vLLM and other servers render
prompts exactly as in training), and `prompt_pieces`: what such a server renders for
`add_generation_prompt=True`. A template class without `jinja` is refused when defined.
Jinja texts use whitespace-control tags only: transformers compiles chat templates with
trim_blocks and lstrip_blocks, and every newline we render is a string literal.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from megatron_longalign.data.conversation import ASSISTANT, SYSTEM, Conversation, Turn

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
    # The same rendering as a Jinja chat template (bos_token / eos_token stand for BOS /
    # EOS); with add_generation_prompt it renders `prompt_pieces`.
    jinja: str = ""
    # Template text before an answer that belongs to the answer's turn at inference:
    # the generation prompt stops before it (Llama-2's reference prompt ends at
    # "[/INST]"; the space goes with the answer's first word, "▁Sure", as in training).
    answer_lead: str = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and not cls.jinja:
            raise TypeError(f"template {cls.name!r} has no `jinja` (its HF chat template)")

    def pieces(self, conversation: Conversation) -> list[Piece]:
        raise NotImplementedError

    def prompt_pieces(self, conversation: Conversation) -> list[Piece]:
        """The generation prompt for a conversation that ends with a user turn: its
        pieces up to where the answer's content starts (less `answer_lead`), i.e. what
        `jinja` renders with add_generation_prompt=True."""
        if not conversation.turns or conversation.turns[-1].role == ASSISTANT:
            raise ValueError("a generation prompt needs a conversation that ends with a user turn")
        placeholder = "\x00answer"
        answered = Conversation((*conversation.turns, Turn(ASSISTANT, placeholder)))
        pieces = self.pieces(answered)
        cut = max(i for i, p in enumerate(pieces) if p.text == placeholder)
        out = pieces[:cut]
        if self.answer_lead:
            last = out[-1]
            assert last.special is None and last.text.endswith(self.answer_lead), last
            out[-1] = Piece(last.kind, last.text[: -len(self.answer_lead)])
        return [p for p in out if p.special is not None or p.text]


class Llama2Template(ChatTemplate):
    name = "llama2"
    description = "<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer}</s>"

    answer_lead = " "
    jinja = (
        "{%- set ns = namespace(first=true) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- bos_token + '[INST] ' -}}"
        "{%- if ns.first and messages[0]['role'] == 'system' -%}"
        "{{- '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -}}"
        "{%- endif -%}"
        "{%- set ns.first = false -%}"
        "{{- message['content'] + ' [/INST]' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- ' ' + message['content'] + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )

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

    jinja = (
        "{{- '<|begin_of_text|>' -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
        "{{- message['content'] + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
        "{%- endif -%}"
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

    jinja = (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- endif -%}"
    )

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

    jinja = (
        "{%- set ns = namespace(round=0) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{{- message['content'] + '\\n\\n' -}}"
        "{%- elif message['role'] == 'user' -%}"
        "{%- if ns.round > 0 -%}{{- '\\n\\n' -}}{%- endif -%}"
        "{%- set ns.round = ns.round + 1 -%}"
        "{{- '[Round ' + ns.round|string + ']\\n\\n问：' + message['content'] + '\\n\\n答：' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- message['content'] + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )

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

    jinja = (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- message['content'] + eos_token -}}"
        "{%- else -%}"
        "{{- message['content'] + '\\n\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )

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
