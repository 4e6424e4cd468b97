"""Export writes the training chat template: for every template and for a sentencepiece
and a byte-level BPE tokenizer, the exported directory's
`AutoTokenizer.apply_chat_template` gives exactly the training token ids (data/encoding.py)
of the same conversation, and with add_generation_prompt=True the prompt part of it.

The reference is transformers itself (Jinja rendering, then its tokenizer with
add_special_tokens=False), never our own rendering."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_longalign.convert.errors import ConversionError
from megatron_longalign.convert.export_template import (
    exported_template,
    recorded_template,
    resolve_template,
)
from megatron_longalign.convert.hf_export import export_checkpoint
from megatron_longalign.data.conversation import conversation_from_record
from megatron_longalign.data.encoding import SampleEncoder
from megatron_longalign.data.indexed import FORMAT
from megatron_longalign.data.templates import TEMPLATES, ChatTemplate, RegionKind, get_template
from megatron_longalign.data.tokenizer import load_tokenizer
from megatron_longalign.devdata.tokenizer_training import train_hf_bpe
from tests.conftest import REPO, _training_lines, chat

SAMPLE_SP = REPO / "data" / "sample" / "tokenizer.model"
# Multi-turn with a system prompt (a context split in the first user turn); answers
# start with words whose space-prefixed token both tokenizers have, so Llama-2's
# "[/INST] " + answer merges into one token, as with the real Llama-2 tokenizer.
CONVERSATIONS = [
    chat(
        "Doc one here.\n\nWhat is it?", "The first.", "And then?", "The end ok.", system="Be nice."
    ),
    chat("Just a question?", "The answer."),
]
TOKENIZERS = ("sentencepiece", "hf_bpe")


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict:
    """Tokenizer source directories as export copies them: the sample sentencepiece
    model alone, and an HF byte-level BPE with Llama-3's (and Qwen2's) regex."""
    root = tmp_path_factory.mktemp("chat_template_tokenizers")
    (root / "sp").mkdir()
    shutil.copyfile(SAMPLE_SP, root / "sp" / "tokenizer.model")
    lines = _training_lines(2000, seed=3) + ["The first. The end. The answer."] * 50
    train_hf_bpe(lines, root / "bpe", 700, "llama3_regex")
    return {"sentencepiece": root / "sp", "hf_bpe": root / "bpe"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf_dirs):
    from megatron_longalign.convert.hf_import import import_hf_checkpoint

    out = tmp_path_factory.mktemp("chat_template_ckpt") / "ckpt"
    return import_hf_checkpoint(hf_dirs["llama_gqa"], out, dtype="fp32", progress=False).output


def _training_tokenizer(kind: str, directory):
    return load_tokenizer(directory / "tokenizer.model" if kind == "sentencepiece" else directory)


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_exported_chat_template_gives_the_training_tokens(
    tmp_path, checkpoint, tokenizer_dirs, kind, template
):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    result = export_checkpoint(
        checkpoint, out, tokenizer_dir=tokenizer_dirs[kind], template=template, progress=False
    )
    assert result.template == template
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == get_template(template).jinja
    assert exported_template(out) == template

    hf = AutoTokenizer.from_pretrained(out)
    encoder = SampleEncoder(_training_tokenizer(kind, tokenizer_dirs[kind]), get_template(template))
    for record in CONVERSATIONS:
        messages = record["messages"]
        sample = encoder.encode(conversation_from_record(record))
        full = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert full == sample.tokens.tolist(), hf.apply_chat_template(messages, tokenize=False)
        # The generation prompt: everything before the last answer's first token.
        answer_start = [s for s, _, k in sample.regions.tolist() if k == RegionKind.ASSISTANT][-1]
        prompt = hf.apply_chat_template(
            messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert prompt == sample.tokens[:answer_start].tolist()


def test_the_generation_prompt_pieces_render_what_the_jinja_renders():
    from transformers.utils.chat_template_utils import render_jinja_template

    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    for template in TEMPLATES.values():
        for record in CONVERSATIONS:
            messages = record["messages"][:-1]
            conversation = conversation_from_record(
                {"messages": [*messages, record["messages"][-1]]}
            )
            turns = conversation.turns[:-1]
            pieces = template.prompt_pieces(type(conversation)(turns))
            text = "".join(
                p.text
                if p.special is None
                else {"<<bos>>": "<s>", "<<eos>>": "</s>"}.get(p.special, p.special)
                for p in pieces
            )
            rendered, _ = render_jinja_template(
                conversations=[messages],
                add_generation_prompt=True,
                chat_template=template.jinja,
                **specials,
            )
            assert rendered[0] == text, template.name


def test_a_template_without_jinja_is_refused():
    with pytest.raises(TypeError, match="no `jinja`"):

        class Forgotten(ChatTemplate):  # noqa: F841
            name = "forgotten"


def test_template_resolution_order(tmp_path, caplog):
    prefix = tmp_path / "P"
    (tmp_path / "P.json").write_text(
        json.dumps({"format": FORMAT, "template": {"name": "chatglm"}})
    )
    recorded = {"data": {"template": {"name": "llama3", "format": "..."}}}
    assert recorded_template(recorded) == "llama3"
    assert resolve_template(None, recorded, prefix) == "llama3"  # the checkpoint's record
    assert resolve_template(None, {}, prefix) == "chatglm"  # else the data's P.json
    assert resolve_template(None, {}) is None
    with caplog.at_level("WARNING"):
        assert resolve_template("chatml", recorded) == "chatml"
    assert "trained with 'llama3'" in caplog.text
    with pytest.raises(ConversionError, match="unknown template .nope."):
        resolve_template("nope", {})
    with pytest.raises(ConversionError, match="not a preprocessed prefix"):
        resolve_template(None, {}, tmp_path / "missing")


def test_export_without_a_known_template_writes_none(tmp_path, checkpoint, tokenizer_dirs):
    out = tmp_path / "hf"
    result = export_checkpoint(
        checkpoint, out, tokenizer_dir=tokenizer_dirs["hf_bpe"], progress=False
    )
    assert result.template is None
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert exported_template(out) is None
