"""Generation backends on CPU: a tiny random Llama saved with the sample sentencepiece
tokenizer and the llama2 chat template (as export writes it).

References are independent of eval/: prompts are built with sentencepiece itself from the
Llama-2 format written by hand, generations come from a direct `model.generate` call, and
truncation is checked against hand-computed halves."""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import pytest
import torch

from megatron_longalign.convert.export_template import write_chat_template
from megatron_longalign.eval.generation import (
    GenerationError,
    GenerationOptions,
    GenerationRequest,
    ModelSourceError,
    add_generation_arguments,
    build_generator,
    generation_options_from_args,
    middle_truncate,
)
from tests.conftest import REPO
from tests.helpers.openai_server import OpenAIStub, StubReply

SAMPLE_SP = REPO / "data" / "sample" / "tokenizer.model"
PROMPTS = {
    "a": "The quick brown fox jumps over the lazy dog.\n\nWhat jumps?",
    "b": "Short one?",
    "c": "Read this: alpha beta gamma delta epsilon zeta eta theta.\n\nList them.",
}


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(SAMPLE_SP))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sp):
    """A tiny random LlamaForCausalLM with the sample tokenizer and the llama2 template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("gen") / "hf"
    config = LlamaConfig(
        vocab_size=sp.get_piece_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=sp.bos_id(),
        eos_token_id=sp.eos_id(),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a large spread: greedy outputs differ from prompt to prompt
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    shutil.copyfile(SAMPLE_SP, directory / "tokenizer.model")
    write_chat_template(directory, "llama2", {})
    return directory


def llama2_prompt_ids(sp, user: str) -> list[int]:
    """Llama-2's format by hand: <s>[INST] {user} [/INST] (the answer's space goes with it)."""
    return [sp.bos_id(), *sp.encode(f"[INST] {user} [/INST]")]


def reference_generation(model_dir, sp, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sp.eos_id(),
            pad_token_id=sp.eos_id(),
        )
    new = out[0, len(ids) :].tolist()
    if sp.eos_id() in new:
        new = new[: new.index(sp.eos_id()) + 1]
        return sp.decode(new[:-1]).strip(), len(new)
    return sp.decode(new).strip(), len(new)


def _generate(options: GenerationOptions, requests) -> dict:
    generator = build_generator(options)
    try:
        return {g.key: g for g in generator.generate(requests)}
    finally:
        generator.close()


def test_middle_truncate_keeps_first_and_last_halves():
    ids = list(range(10))
    assert middle_truncate(ids, 4) == [0, 1, 8, 9]
    assert middle_truncate(ids, 5) == [0, 1, 2, 8, 9]
    assert middle_truncate(ids, 1) == [0]
    assert middle_truncate(ids, 10) == ids and middle_truncate(ids, 50) == ids
    with pytest.raises(ValueError, match="at least 1"):
        middle_truncate(ids, 0)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_transformers_equals_a_direct_generate_call(model_dir, sp, batch_size):
    requests = [GenerationRequest(key, text, 6) for key, text in PROMPTS.items()]
    options = GenerationOptions(
        "transformers", str(model_dir), batch_size=batch_size, dtype="fp32", device="cpu"
    )
    got = _generate(options, requests)
    assert set(got) == set(PROMPTS)
    for key, text in PROMPTS.items():
        ids = llama2_prompt_ids(sp, text)
        expected_text, expected_count = reference_generation(model_dir, sp, ids, 6)
        assert got[key].prompt_tokens == len(ids)
        assert (got[key].text, got[key].completion_tokens) == (expected_text, expected_count)
        assert got[key].truncated_tokens == 0
    assert any(g.text for g in got.values())  # a random model still says something


def test_a_raw_request_is_bos_and_text_without_the_template(model_dir, sp):
    """raw=True (LongBench's few-shot and code tasks): BOS + the text, no [INST]."""
    text = PROMPTS["a"]
    ids = [sp.bos_id(), *sp.encode(text)]
    options = GenerationOptions("transformers", str(model_dir), dtype="fp32", device="cpu")
    (got,) = _generate(options, [GenerationRequest("a", text, 6, raw=True)]).values()
    assert got.prompt_tokens == len(ids)
    assert (got.text, got.completion_tokens) == reference_generation(model_dir, sp, ids, 6)


def test_openai_backend_sends_raw_requests_to_the_completions_endpoint(model_dir):
    with OpenAIStub(lambda body: "completed") as server:
        options = GenerationOptions(
            "openai", str(model_dir), base_url=server.base_url, served_model="served-x"
        )
        got = _generate(options, [GenerationRequest("r", "Q: 1+1?\nA:", 4, raw=True)])
    (body,) = server.requests
    assert body["prompt"] == "Q: 1+1?\nA:" and "messages" not in body
    assert body["max_tokens"] == 4 and got["r"].text == "completed"


def test_truncation_keeps_the_first_and_last_halves_of_the_message(model_dir, sp):
    text = PROMPTS["c"]
    ids = sp.encode(text)
    assert len(ids) > 12
    # By hand: 12 kept = the first 6 and the last 6 tokens, each half decoded, joined.
    kept = sp.decode(ids[:6]) + sp.decode(ids[-6:])
    prompt = llama2_prompt_ids(sp, kept)
    options = GenerationOptions("transformers", str(model_dir), max_length=12, device="cpu")
    (got,) = _generate(options, [GenerationRequest("c", text, 5)]).values()
    assert got.truncated_tokens == len(ids) - 12
    assert got.prompt_tokens == len(prompt)
    assert (got.text, got.completion_tokens) == reference_generation(model_dir, sp, prompt, 5)


def test_openai_backend_sends_the_truncated_message_and_returns_the_reply(model_dir, sp):
    text = PROMPTS["c"]
    ids = sp.encode(text)
    expected_message = sp.decode(ids[:5]) + sp.decode(ids[-5:])  # max_length 10
    replies = {text: "first", expected_message: "  the reply  "}

    def reply(body: dict):
        return StubReply(text=replies.get(body["messages"][-1]["content"], "?"), prompt_tokens=17)

    with OpenAIStub(reply) as server:
        options = GenerationOptions(
            "openai",
            str(model_dir),
            max_length=10,
            base_url=server.base_url,
            served_model="served-x",
            concurrency=2,
        )
        got = _generate(
            options, [GenerationRequest("c", text, 9), GenerationRequest("b", "Hi?", 3)]
        )
    (request_c,) = [r for r in server.requests if r["max_tokens"] == 9]
    assert request_c["messages"] == [{"role": "user", "content": expected_message}]
    assert request_c["model"] == "served-x" and request_c["temperature"] == 0
    assert got["c"].text == "the reply" and got["c"].truncated_tokens == len(ids) - 10
    assert got["c"].prompt_tokens == 17 and got["c"].completion_tokens == 2
    assert got["b"].truncated_tokens == 0


def test_openai_truncation_needs_a_local_tokenizer():
    options = GenerationOptions(
        "openai", "remote-name", max_length=10, base_url="http://x/v1", served_model="m"
    )
    with pytest.raises(GenerationError, match="needs the tokenizer locally"):
        build_generator(options)


def test_clear_errors(tmp_path, model_dir):
    with pytest.raises(GenerationError, match="unknown --backend 'tgi'"):
        build_generator(GenerationOptions("tgi", str(model_dir)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match=f"{broken}.*lacks weights.*a tokenizer"):
        build_generator(GenerationOptions("transformers", str(broken)))
    with pytest.raises(ModelSourceError, match="does not exist"):
        build_generator(GenerationOptions("transformers", str(tmp_path / "nothing")))
    with pytest.raises(GenerationError, match="needs --base-url and --served-model"):
        build_generator(GenerationOptions("openai", str(model_dir)))


def test_vllm_not_installed_is_a_clear_error(model_dir):
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(GenerationError, match="needs the vllm package"):
            build_generator(GenerationOptions("vllm", str(model_dir)))
    else:
        pytest.skip("vllm is installed here: test_vllm_generates covers it")


def test_vllm_generates(model_dir, sp):
    pytest.importorskip("vllm", reason="vllm is not installed (it needs a GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("vllm needs a GPU")
    requests = [GenerationRequest(key, text, 6) for key, text in PROMPTS.items()]
    got = _generate(GenerationOptions("vllm", str(model_dir), dtype="fp32"), requests)
    for key, text in PROMPTS.items():
        assert got[key].prompt_tokens == len(llama2_prompt_ids(sp, text))
        assert 0 < got[key].completion_tokens <= 6


def test_template_override_warns_and_a_missing_template_is_an_error(tmp_path, model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        generator = build_generator(
            GenerationOptions("transformers", str(model_dir), template="plain", device="cpu")
        )
        generator.close()
    assert "differs from the template" in caplog.text and "(llama2)" in caplog.text
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "longalign.json").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages }}"
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="no training chat template.*--template"):
        build_generator(GenerationOptions("transformers", str(bare)))


def test_cli_options_round_trip():
    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    args = parser.parse_args(
        [
            "--backend",
            "openai",
            "--model",
            "m",
            "--max-length",
            "100",
            "--base-url",
            "http://h/v1",
            "--served-model",
            "s",
            "--tokenizer",
            "t",
            "--template",
            "chatml",
            "--concurrency",
            "3",
            "--batch-size",
            "2",
            "--dtype",
            "bf16",
            "--device",
            "cpu",
        ]
    )
    assert generation_options_from_args(args) == GenerationOptions(
        "openai", "m", 100, "http://h/v1", "s", "t", "chatml", 3, 2, "bf16", "cpu"
    )
    defaults = generation_options_from_args(parser.parse_args(["--model", "m"]))
    assert defaults == GenerationOptions("transformers", "m")


@pytest.mark.slow
def test_a_trainer_checkpoint_is_exported_and_generates_as_its_hf_model(tmp_path, model_dir):
    """--model may be a trainer checkpoint: exported to a temporary directory (removed on
    close) that generates exactly what the HF model it was imported from generates."""
    import subprocess
    import sys

    checkpoint = tmp_path / "ckpt"
    imported = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_hf.py"), "import", "--hf-dir",
         str(model_dir), "--output", str(checkpoint), "--dtype", "fp32", "--no-progress"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    requests = [GenerationRequest(key, text, 5) for key, text in PROMPTS.items()]
    expected = _generate(GenerationOptions("transformers", str(model_dir), device="cpu"), requests)
    generator = build_generator(GenerationOptions("transformers", str(checkpoint), device="cpu"))
    exported = generator.source.directory
    assert (exported / "model.safetensors").is_file()
    try:
        got = {g.key: g for g in generator.generate(requests)}
    finally:
        generator.close()
    assert not exported.exists()
    assert got == expected


def test_a_checkpoint_that_cannot_be_exported_names_it(tmp_path):
    broken = tmp_path / "ckpt"
    broken.mkdir()
    (broken / "latest").write_text("step_5\n")
    with pytest.raises(ModelSourceError, match=f"cannot export checkpoint {broken}"):
        build_generator(GenerationOptions("transformers", str(broken)))


class _FakeVLLM:
    """A stand-in for the `vllm` package (it needs a GPU), recording what the backend
    passes: the prompt token ids, the sampling parameters, and the calls."""

    calls: list[list[list[int]]] = []
    WORD = 100  # an ordinary (non-special) token of the sample tokenizer

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class TokensPrompt(dict):
        def __init__(self, prompt_token_ids):
            super().__init__(prompt_token_ids=prompt_token_ids)

    class LLM:
        def __init__(self, model, tokenizer, dtype, seed):
            self.model = model

        def generate(self, inputs, params, use_tqdm):
            _FakeVLLM.calls.append([i["prompt_token_ids"] for i in inputs])
            outputs = []
            for p in params:
                assert p.kwargs["temperature"] == 0.0
                # two tokens, then the template's end of answer (within max_tokens)
                tokens = [_FakeVLLM.WORD] * 2 + p.kwargs["stop_token_ids"][:1]
                completion = type("Completion", (), {"token_ids": tokens})
                outputs.append(type("Output", (), {"outputs": [completion]}))
            return outputs


def test_vllm_backend_plumbing_with_a_stand_in(model_dir, sp, monkeypatch):
    """The vllm backend's own code on CPU: exact prompt ids (the training template, the
    truncation), greedy parameters, the stop token, and requests sent in slices so each
    finished slice is recorded before the next starts."""
    import sys
    import types

    from megatron_longalign.eval import backends

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = _FakeVLLM.LLM, _FakeVLLM.SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = _FakeVLLM.TokensPrompt
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(backends, "VLLM_SLICE", 2)
    _FakeVLLM.calls.clear()
    requests = [GenerationRequest(key, text, 3) for key, text in PROMPTS.items()]
    got = _generate(GenerationOptions("vllm", str(model_dir)), requests)
    assert [len(call) for call in _FakeVLLM.calls] == [2, 1]
    sent = [ids for call in _FakeVLLM.calls for ids in call]
    assert sent == [llama2_prompt_ids(sp, text) for text in PROMPTS.values()]
    for key, text in PROMPTS.items():
        assert got[key].prompt_tokens == len(llama2_prompt_ids(sp, text))
        assert got[key].completion_tokens == 3  # the stop token counts as generated
        assert got[key].text == sp.decode([_FakeVLLM.WORD] * 2).strip()
