"""The generation backends behind eval/generation.py's `Generator` protocol.

- transformers: `model.generate` (greedy), batches of left-padded prompts;
- vllm: `vllm.LLM` on prompt token ids (TokensPrompt), SamplingParams(temperature=0);
- openai: chat.completions on an OpenAI-compatible server (utils/chat_api.ChatClient);
  the server applies the chat template export wrote, so only the (truncated) user
  message is sent.

The local backends tokenize prompts themselves (eval/prompts.py), so truncation and the
template are exactly the training ones; all stop at the template's end-of-answer token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from megatron_longalign.eval.prompts import PromptBuilder

if TYPE_CHECKING:
    from megatron_longalign.eval.generation import Generation, GenerationOptions, GenerationRequest

logger = logging.getLogger(__name__)

DTYPE_NAMES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
VLLM_SLICE = 64  # requests per vllm.LLM.generate call


class GenerationError(RuntimeError):
    """A backend cannot be set up (missing package, bad option, model that will not load)."""


def _generation(request, prompt, text: str, completion_tokens: int) -> Generation:
    from megatron_longalign.eval.generation import Generation

    return Generation(
        request.key, text, len(prompt.ids), completion_tokens, prompt.truncated_tokens
    )


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class TransformersGenerator:
    def __init__(self, model_dir: str, tokenizer_path: str, builder: PromptBuilder, options):
        import torch
        from transformers import AutoModelForCausalLM

        self.tokenizer_path = tokenizer_path
        self.builder = builder
        self.options: GenerationOptions = options
        self.device = _device(options.device)
        dtype = DTYPE_NAMES[options.dtype]
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
            )
        except (OSError, ValueError) as err:
            raise GenerationError(
                f"transformers cannot load the model in {model_dir}: {err}"
            ) from err
        self.model = model.to(self.device).eval()
        tok = builder.tokenizer
        self.pad_id = tok.eos_id if tok.eos_id is not None else builder.stop_ids[0]

    def generate(
        self, requests: Sequence[GenerationRequest], *, desc: str | None = None
    ) -> Iterator[Generation]:
        from tqdm import tqdm

        prepared = [
            (r, self.builder.build(r.prompt, self.options.max_length, r.raw)) for r in requests
        ]
        # Similar lengths and budgets together: less padding and fewer wasted steps.
        prepared.sort(key=lambda item: (item[0].max_new_tokens, len(item[1].ids)))
        size = max(1, self.options.batch_size)
        with tqdm(total=len(prepared), desc=desc, disable=desc is None) as bar:
            for start in range(0, len(prepared), size):
                batch = prepared[start : start + size]
                yield from self._batch(batch)
                bar.update(len(batch))

    def _batch(self, batch) -> Iterator[Generation]:
        import torch

        width = max(len(prompt.ids) for _, prompt in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, prompt) in enumerate(batch):  # left padding: generation continues at the end
            ids[row, width - len(prompt.ids) :] = torch.tensor(prompt.ids)
            mask[row, width - len(prompt.ids) :] = 1
        budget = max(request.max_new_tokens for request, _ in batch)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=budget,
                do_sample=False,
                eos_token_id=self.builder.stop_ids,
                pad_token_id=self.pad_id,
            )
        for row, (request, prompt) in enumerate(batch):
            new = out[row, width:].tolist()[: request.max_new_tokens]
            text, count = self.builder.answer_text(new)
            yield _generation(request, prompt, text, count)

    def close(self) -> None:
        self.model = None


class VLLMGenerator:
    def __init__(self, model_dir: str, tokenizer_path: str, builder: PromptBuilder, options):
        try:
            from vllm import LLM
        except ImportError as err:
            raise GenerationError(
                f"--backend vllm needs the vllm package, which is not importable here ({err}); "
                "install vllm on a GPU machine, or use --backend transformers"
            ) from err
        self.tokenizer_path = tokenizer_path
        self.builder = builder
        self.options = options
        self.llm = LLM(
            model=model_dir, tokenizer=model_dir, dtype=DTYPE_NAMES[options.dtype], seed=0
        )

    def generate(
        self, requests: Sequence[GenerationRequest], *, desc: str | None = None
    ) -> Iterator[Generation]:
        from tqdm import tqdm
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # In slices: vLLM schedules each slice as one continuous batch, and the caller
        # records (and a rerun skips) every finished slice, not only the whole run.
        with tqdm(total=len(requests), desc=desc, disable=desc is None) as bar:
            for start in range(0, len(requests), VLLM_SLICE):
                part = requests[start : start + VLLM_SLICE]
                prompts = [
                    self.builder.build(r.prompt, self.options.max_length, r.raw) for r in part
                ]
                params = [
                    SamplingParams(
                        temperature=0.0,
                        max_tokens=r.max_new_tokens,
                        stop_token_ids=self.builder.stop_ids,
                    )
                    for r in part
                ]
                inputs = [TokensPrompt(prompt_token_ids=p.ids) for p in prompts]
                outputs = self.llm.generate(inputs, params, use_tqdm=False)
                for request, prompt, output in zip(part, prompts, outputs, strict=True):
                    text, count = self.builder.answer_text(output.outputs[0].token_ids)
                    yield _generation(request, prompt, text, count)
                bar.update(len(part))

    def close(self) -> None:
        self.llm = None


class OpenAIGenerator:
    def __init__(self, tokenizer_path: str, builder: PromptBuilder | None, options):
        from megatron_longalign.utils.chat_api import ChatClient

        self.tokenizer_path = tokenizer_path
        self.builder = builder
        self.options = options
        self.client = ChatClient(
            options.base_url, options.served_model, concurrency=options.concurrency
        )

    def _one(self, request: GenerationRequest) -> Generation:
        from megatron_longalign.eval.generation import Generation

        text, dropped = request.prompt, 0
        if self.builder is not None:
            text, dropped = self.builder.truncate(request.prompt, self.options.max_length)
        if request.raw:  # no chat template: the completions endpoint
            reply = self.client.complete(text, max_tokens=request.max_new_tokens)
        else:
            reply = self.client.chat(
                [{"role": "user", "content": text}],
                temperature=0.0,
                max_tokens=request.max_new_tokens,
            )
        return Generation(
            request.key, reply.text.strip(), reply.prompt_tokens, reply.completion_tokens, dropped
        )

    def generate(
        self, requests: Sequence[GenerationRequest], *, desc: str | None = None
    ) -> Iterator[Generation]:
        for _, generation in self.client.map(self._one, requests, desc=desc):
            yield generation

    def close(self) -> None:
        self.client.close()
