"""Generation for evaluation: one interface over transformers, vLLM and OpenAI-compatible
servers (docs/EVALUATION.md, "Generation backends").

    generator = build_generator(GenerationOptions(backend="transformers", model="hf/"))
    for generation in generator.generate(requests, desc="needle"):
        ...
    generator.close()

Prompts are the user message of each request, middle-truncated to `max_length` tokens
and rendered with the training chat template and tokenization (eval/prompts.py); the
model is an exported HF directory or a trainer checkpoint exported on the fly
(eval/model_source.py). Decoding is greedy everywhere.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from megatron_longalign.data.tokenizer import TokenizerError, load_tokenizer
from megatron_longalign.eval.backends import (
    DTYPE_NAMES,
    GenerationError,
    OpenAIGenerator,
    TransformersGenerator,
    VLLMGenerator,
)
from megatron_longalign.eval.model_source import (
    ModelSource,
    ModelSourceError,
    choose_template,
    open_model,
    tokenizer_path,
)
from megatron_longalign.eval.prompts import PromptBuilder, middle_truncate

__all__ = [
    "BACKENDS",
    "Generation",
    "GenerationError",
    "GenerationOptions",
    "GenerationRequest",
    "Generator",
    "ModelSourceError",
    "add_generation_arguments",
    "build_generator",
    "generation_options_from_args",
    "middle_truncate",
]

logger = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm", "openai")


@dataclass(frozen=True)
class GenerationRequest:
    key: str
    prompt: str  # the user message (task prompt incl. the long document)
    max_new_tokens: int
    # True: the prompt as plain text (BOS + text, no chat template; the openai backend uses
    # the completions endpoint), as LongBench prompts its few-shot and code tasks.
    raw: bool = False


@dataclass(frozen=True)
class Generation:
    key: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    truncated_tokens: int  # user-message tokens dropped by middle truncation


@dataclass(frozen=True)
class GenerationOptions:
    backend: str  # "transformers" | "vllm" | "openai"
    model: str  # exported HF dir, or a trainer checkpoint dir (exported to a temp dir)
    max_length: int | None = None  # user-message tokens kept (middle truncation)
    base_url: str | None = None  # openai backend
    served_model: str | None = None  # openai backend: the server's model name
    tokenizer: str | None = None  # default: the model dir's tokenizer
    template: str | None = None  # default: the trained template; warned if it differs
    concurrency: int = 8
    batch_size: int = 1
    dtype: str = "auto"
    device: str = "auto"


class Generator(Protocol):
    tokenizer_path: str  # data.tokenizer.load_tokenizer reads it ("" when unknown: openai)

    def generate(
        self, requests: Sequence[GenerationRequest], *, desc: str | None = None
    ) -> Iterator[Generation]: ...

    def close(self) -> None: ...


class _Owned:
    """A backend plus the model source it runs on (a temporary export is removed on close)."""

    def __init__(self, backend, source: ModelSource | None) -> None:
        self.backend, self.source = backend, source
        self.tokenizer_path: str = backend.tokenizer_path

    def generate(
        self, requests: Sequence[GenerationRequest], *, desc: str | None = None
    ) -> Iterator[Generation]:
        return self.backend.generate(requests, desc=desc)

    def close(self) -> None:
        try:
            self.backend.close()
        finally:
            if self.source is not None:
                self.source.close()


def check_options(options: GenerationOptions) -> None:
    """Option errors, before anything is loaded."""
    if options.backend not in BACKENDS:
        raise GenerationError(f"unknown --backend {options.backend!r}; choose one of {BACKENDS}")
    if options.max_length is not None and options.max_length < 1:
        raise GenerationError(f"--max-length must be at least 1, got {options.max_length}")
    if options.dtype not in DTYPE_NAMES:
        raise GenerationError(f"--dtype {options.dtype!r}: choose one of {sorted(DTYPE_NAMES)}")
    if options.batch_size < 1 or options.concurrency < 1:
        raise GenerationError("--batch-size and --concurrency must be at least 1")
    if options.backend == "openai" and not (options.base_url and options.served_model):
        raise GenerationError("--backend openai needs --base-url and --served-model")


def build_generator(options: GenerationOptions) -> Generator:
    """The backend `options` names, ready to generate. Raises GenerationError /
    ModelSourceError (both ValueError-like, naming the option or path) before any long
    work when the options, model, tokenizer or template are unusable."""
    check_options(options)
    if options.backend == "openai":
        return _openai(options)
    if options.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as err:  # fail before exporting or loading anything
            raise GenerationError(
                f"--backend vllm needs the vllm package, which is not importable ({err}); "
                "install vllm (GPU), or use --backend transformers"
            ) from None
    source = open_model(options.model, options.tokenizer)
    try:
        builder, tok_path = _builder(source.directory, options)
        cls = TransformersGenerator if options.backend == "transformers" else VLLMGenerator
        return _Owned(cls(str(source.directory), tok_path, builder, options), source)
    except BaseException:
        source.close()
        raise


def _builder(
    directory: Path | None, options: GenerationOptions, with_template: bool = True
) -> tuple[PromptBuilder, str]:
    path = tokenizer_path(directory, options.tokenizer) if directory else str(options.tokenizer)
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as err:
        raise ModelSourceError(f"tokenizer: {err}") from None
    template = choose_template(directory, options.template) if with_template else None
    return PromptBuilder(tokenizer, template), path


def _openai(options: GenerationOptions) -> Generator:
    """The server renders the template; a local tokenizer is needed only to truncate."""
    local = Path(options.model)
    directory = local if local.is_dir() else None
    builder, path = None, ""
    if options.template is not None:
        logger.warning("--template is not used with --backend openai: the server renders its own")
    if options.tokenizer is not None or directory is not None:
        builder, path = _builder(directory, options, with_template=False)
    elif options.max_length is not None:
        raise GenerationError(
            "--max-length with --backend openai needs the tokenizer locally: pass --tokenizer "
            "or a local --model directory"
        )
    return _Owned(OpenAIGenerator(path, builder, options), None)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared generation options of tools/evaluate.py's commands."""
    group = parser.add_argument_group("generation")
    group.add_argument("--backend", choices=BACKENDS, default="transformers")
    group.add_argument(
        "--model",
        required=True,
        help="exported HF directory or trainer checkpoint (exported to a temporary dir); "
        "with --backend openai, a local directory for the tokenizer/template (optional)",
    )
    group.add_argument(
        "--max-length",
        type=int,
        help="keep this many prompt tokens: the first and last halves (middle truncation)",
    )
    group.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://host:8000/v1")
    group.add_argument("--served-model", help="the server's model name (--backend openai)")
    group.add_argument("--tokenizer", help="tokenizer directory or .model (default: the model's)")
    group.add_argument("--template", help="chat template (default: the trained one)")
    group.add_argument("--concurrency", type=int, default=8, help="requests in flight (openai)")
    group.add_argument("--batch-size", type=int, default=1, help="prompts per batch (transformers)")
    group.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="auto")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (transformers)")


def generation_options_from_args(args: argparse.Namespace) -> GenerationOptions:
    return GenerationOptions(
        backend=args.backend,
        model=str(args.model),
        max_length=args.max_length,
        base_url=args.base_url,
        served_model=args.served_model,
        tokenizer=None if args.tokenizer is None else str(args.tokenizer),
        template=args.template,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
    )
