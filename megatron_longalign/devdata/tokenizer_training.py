"""Train tiny tokenizers for the bundled demo data and the tests.

Every template's special tokens are registered as *control* tokens (sentencepiece) or
special added tokens (HF), so any template works with any tokenizer trained here, and
the same strings in user text stay plain text.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

TEMPLATE_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
)
# Llama-3's pre-tokenizer regex (Qwen2's differs only in splitting digits one by one).
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Template scaffolding text, so the tokenizer learns compact pieces for it.
SCAFFOLDING_TEXT = (
    "[INST] <<SYS>>\n\n<</SYS>>\n\n [/INST] ",
    "[Round 1]\n\n问：\n\n答：",
    "system\n\nuser\n\nassistant\n\n",
)


def train_sentencepiece(
    lines: Iterable[str],
    output: str | os.PathLike,
    vocab_size: int = 2048,
    normalization: str = "identity",
) -> Path:
    """A BPE sentencepiece model with byte fallback, written atomically to `output`.

    normalization="identity": no dummy prefix, no whitespace rewriting, identity
    normaliser (lossless on any text). normalization="default": sentencepiece's own
    defaults (the `nmt_nfkc` normaliser, a dummy prefix, extra whitespace removed), as
    many published models have."""
    import sentencepiece as spm

    if normalization == "identity":
        normaliser = {
            "add_dummy_prefix": False,
            "remove_extra_whitespaces": False,
            "normalization_rule_name": "identity",
            "allow_whitespace_only_pieces": True,
        }
    elif normalization == "default":
        normaliser = {}
    else:
        raise ValueError(f"unknown normalization {normalization!r}")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(SCAFFOLDING_TEXT) * 50 + list(lines)),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        **normaliser,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        control_symbols=list(TEMPLATE_SPECIAL_TOKENS),
        num_threads=1,
        max_sentence_length=1 << 16,
        minloglevel=2,
        hard_vocab_limit=False,  # small corpora may not support the full vocab_size
    )
    return _write_atomically(Path(output), buffer.getvalue())


def train_hf_bpe(
    lines: Iterable[str],
    output_dir: str | os.PathLike,
    vocab_size: int = 1024,
    style: str = "byte_level",
    special_tokens: Sequence[str] = TEMPLATE_SPECIAL_TOKENS,
) -> Path:
    """A Hugging Face BPE tokenizer directory (tokenizer.json + tokenizer_config.json).

    Styles, after the published tokenizers they imitate:
    - "byte_level": GPT-2's byte-level pre-tokenizer and regex;
    - "llama3_regex": byte-level BPE split by Llama-3's (and Qwen2's) regex;
    - "metaspace": HF Llama-2/Mistral (Metaspace, "▁" prepended to the first word);
    - "llama2_legacy": the older HF Llama-2 layout, a normaliser that prepends "▁" to
      every text between special tokens and replaces spaces, with no pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bos, eos, unk = "<s>", "</s>", "<unk>"
    specials = [unk, bos, eos, *special_tokens]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    if style == "byte_level":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    elif style == "llama3_regex":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
    elif style == "metaspace":
        tokenizer = Tokenizer(models.BPE(unk_token=unk, byte_fallback=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Sequence(
            [decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()]
        )
    elif style == "llama2_legacy":
        tokenizer = Tokenizer(models.BPE(unk_token=unk, byte_fallback=True))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        tokenizer.decoder = decoders.Sequence(
            [
                decoders.Replace("\u2581", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    else:
        raise ValueError(f"unknown style {style!r}")
    byte_level = style in ("byte_level", "llama3_regex")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(SCAFFOLDING_TEXT) * 50 + list(lines), trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    if not byte_level:
        # Byte fallback needs the <0xXX> pieces in the model vocabulary itself, which the
        # trainer does not do; append them so any text stays lossless.
        vocab = spec["model"]["vocab"]
        for piece in byte_pieces:
            vocab.setdefault(piece, len(vocab))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(output_dir / "tokenizer.json", json.dumps(spec, ensure_ascii=False).encode())
    config = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "model_max_length": 1 << 20}
    _write_atomically(output_dir / "tokenizer_config.json", json.dumps(config, indent=2).encode())
    return output_dir


def _write_atomically(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temp.write_bytes(data)
    os.replace(temp, path)
    return path
