#!/usr/bin/env python
"""Convert Hugging Face checkpoints (Llama-2/3, Mistral, Qwen2/2.5) to and from this
trainer's checkpoints (docs/HF_CONVERSION.md).

    python tools/convert_hf.py import --hf-dir /models/Llama-3.1-8B --output ckpt/llama3_8b
    torchrun --nproc-per-node 4 tools/convert_hf.py import --hf-dir D --output O --tp 2 --pp 2
    python tools/convert_hf.py export --checkpoint runs/x/checkpoints --output hf_out \\
        [--tokenizer /models/Llama-3.1-8B] [--max-shard-size 5GB] [--dtype bf16]

Runs on CPU (gloo). Bad input exits with code 2 and a one-line message; the output
directory is created only when the conversion succeeded.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_longalign  # noqa: F401
except ImportError:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from megatron_longalign.convert.errors import ConversionError  # noqa: E402

DTYPE_CHOICES = ("auto", "bf16", "fp32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import", help="HF directory -> trainer checkpoint root")
    imp.add_argument("--hf-dir", required=True, type=Path, help="local HF model directory")
    imp.add_argument("--output", required=True, type=Path, help="new checkpoint root")
    imp.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="parameter dtype (auto: fp32 for fp32/fp16 checkpoints, else bf16)",
    )
    imp.add_argument("--name", help="model config name (default: from the HF directory name)")
    imp.add_argument("--tp", type=int, default=1, help="tensor parallel size (under torchrun)")
    imp.add_argument("--pp", type=int, default=1, help="pipeline parallel size (under torchrun)")
    imp.add_argument(
        "--vocab-multiple",
        type=int,
        default=128,
        help="make_vocab_size_divisible_by written to the model YAML (vocab padding)",
    )
    imp.add_argument(
        "--ignore-extra",
        action="store_true",
        help="skip (and list) HF tensors the model has no place for instead of failing",
    )
    imp.add_argument("--no-progress", action="store_true")

    exp = commands.add_parser("export", help="trainer checkpoint -> HF directory")
    exp.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoint dir or root with `latest`"
    )
    exp.add_argument("--output", required=True, type=Path, help="new HF model directory")
    exp.add_argument("--tokenizer", type=Path, help="copy tokenizer files from this directory")
    exp.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB")
    exp.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: the checkpoint's dtype"
    )
    exp.add_argument(
        "--model-config",
        type=Path,
        help="model YAML (or a run's config.yaml); default: recorded by the import",
    )
    exp.add_argument(
        "--architecture",
        choices=("llama", "mistral", "qwen2"),
        help="HF model_type (default: the imported one; else qwen2 with qkv bias, else llama)",
    )
    exp.add_argument(
        "--template",
        help="chat template written into tokenizer_config.json (default: the checkpoint's "
        "recorded one, else the one --data-prefix's P.json names)",
    )
    exp.add_argument("--data-prefix", help="a preprocessed set the model was trained on")
    exp.add_argument("--no-progress", action="store_true")
    return parser


def _setup(tp: int, pp: int) -> None:
    from megatron_longalign.config.parallel import ParallelConfig
    from megatron_longalign.parallel.distributed import initialize_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        raise ConversionError(
            f"--tp {tp} x --pp {pp} needs exactly {tp * pp} processes (torchrun "
            f"--nproc-per-node {tp * pp}), got {world}"
        )
    # CPU and gloo even on a GPU node: conversion is file I/O and copies, and host
    # memory is where a whole model fits.
    initialize_distributed(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        seed=0,
        cpu=True,
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def run_import(args: argparse.Namespace) -> None:
    from megatron_longalign.convert.hf_import import import_hf_checkpoint
    from megatron_longalign.convert.model_io import is_rank0

    _setup(args.tp, args.pp)
    result = import_hf_checkpoint(
        args.hf_dir,
        args.output,
        dtype=args.dtype,
        name=args.name,
        make_vocab_size_divisible_by=args.vocab_multiple,
        ignore_extra=args.ignore_extra,
        progress=not args.no_progress,
    )
    if not is_rank0():
        return
    config = result.model_config
    print(f"imported {args.hf_dir} -> {result.checkpoint}")
    print(
        f"  {result.parameters / 1e6:.1f}M parameters, {config.num_layers} layers, "
        f"dtype {result.dtype}, TP={args.tp} PP={args.pp}, {result.seconds:.1f}s"
    )
    print(
        f"  vocab {config.vocab_size} (padded to {config.padded_vocab_size(args.tp)} at "
        f"TP={args.tp}; padded rows are zero)"
    )
    if result.ignored:
        shown = ", ".join(result.ignored[:5]) + (" ..." if len(result.ignored) > 5 else "")
        print(f"  ignored {len(result.ignored)} tensor(s): {shown}")
    print(f"  model config: {result.yaml_path}")
    print(
        f"  train with: 'hydra.searchpath=[file://{result.output}/conf]' "
        f"model={config.name} train.init_from={result.output}"
    )


def run_export(args: argparse.Namespace) -> None:
    from megatron_longalign.convert.hf_config import model_config_from_yaml
    from megatron_longalign.convert.hf_export import export_checkpoint

    model_config = None
    if args.model_config is not None:
        if not args.model_config.is_file():
            raise ConversionError(f"--model-config {args.model_config} does not exist")
        model_config = model_config_from_yaml(str(args.model_config))
    _setup(1, 1)
    result = export_checkpoint(
        args.checkpoint,
        args.output,
        dtype=args.dtype,
        model_config=model_config,
        model_type=args.architecture,
        tokenizer_dir=args.tokenizer,
        max_shard_size=args.max_shard_size,
        progress=not args.no_progress,
        template=args.template,
        data_prefix=args.data_prefix,
    )
    print(f"exported {args.checkpoint} -> {result.output} ({result.model_type})")
    print(
        f"  {result.tensors} tensors, {_size(result.total_bytes)} {result.dtype} in "
        f"{len(result.files)} shard(s), {result.seconds:.1f}s"
    )
    copied = ", ".join(result.copied) or "none"
    print(f"  copied: {copied}")
    print(f"  chat template: {result.template or 'none (pass --template)'}")
    if not set(result.copied) - {"generation_config.json"}:
        print("  no tokenizer files: pass --tokenizer DIR to include them")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # megatron (optional GPU packages the CPU converter never uses) and torch's
    # dist-checkpoint deprecations are noise for a command-line user.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from megatron_longalign.training.checkpoint import CheckpointError

    try:
        run_import(args) if args.command == "import" else run_export(args)
    except (ConversionError, CheckpointError) as err:
        message = " ".join(str(err).split())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        import torch

        if torch.distributed.is_initialized():
            from megatron_longalign.parallel.distributed import destroy_distributed

            destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
