"""tokenizer_fingerprint(path) is load_tokenizer(path).fingerprint (the tokenizer.sha256 a
preprocessed set records) for every kind of tokenizer path, without building one; the
scoring engine compares models with data by it."""

from __future__ import annotations

import shutil

import pytest

from megatron_longalign.data.tokenizer import TokenizerError, load_tokenizer, tokenizer_fingerprint


@pytest.mark.parametrize("name", ["sentencepiece", "hf_byte_level", "hf_metaspace"])
def test_fingerprint_of_the_files_is_the_loaded_tokenizers(tokenizer_paths, name):
    path = tokenizer_paths[name]
    assert tokenizer_fingerprint(path) == load_tokenizer(path).fingerprint


def test_directory_with_a_sentencepiece_model(tokenizer_paths, tmp_path):
    shutil.copy(tokenizer_paths["sentencepiece"], tmp_path / "tokenizer.model")
    assert tokenizer_fingerprint(tmp_path) == load_tokenizer(tmp_path).fingerprint
    assert tokenizer_fingerprint(tmp_path) == tokenizer_fingerprint(
        tokenizer_paths["sentencepiece"]
    )
    assert tokenizer_fingerprint(tmp_path) != tokenizer_fingerprint(
        tokenizer_paths["hf_byte_level"]
    )


def test_not_a_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="neither tokenizer.json"):
        tokenizer_fingerprint(tmp_path)
