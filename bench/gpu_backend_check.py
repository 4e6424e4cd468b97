#!/usr/bin/env python
"""Attention backends through the whole model on one device: loss and every parameter's
gradient of each backend against an fp32 `sdpa` reference, on packed documents with
SkipAlign-style skipped position ids and GQA.

This is a check, not a benchmark: it exits 1 when a backend is outside its tolerance.
On a GPU (bf16) it is the check that `flex` (compiled flex_attention with the
document-causal BlockMask, forward and backward) is as accurate as `sdpa` (torch's
SDPA per document): both run in bf16, and each one's error against the fp32 reference
is measured as ||x - ref|| / ||ref|| over all parameter gradients (METHOD: bf16 lands
between 1e-3 and 1e-2). `flex` passes when its error is at most 1.5 x sdpa-bf16's plus
2e-3, and its loss within 1e-2 relative. An fp32 `flex` must equal the fp32 reference
to 1e-4 (same function, same precision). On the CPU (`--device cpu`, where only `sdpa`
can run a backward) it runs the same code path as a smoke test.

    python bench/gpu_backend_check.py                      # cuda: flex and sdpa, bf16
    python bench/gpu_backend_check.py --device cpu --tokens 600 --backends sdpa
    python bench/gpu_backend_check.py --output-json check.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BF16_SLACK = 1.5  # flex-bf16 error may be this multiple of sdpa-bf16's ...
BF16_FLOOR = 2e-3  # ... plus this
FP32_TOLERANCE = 1e-4  # flex-fp32 vs sdpa-fp32: the same function at the same precision
LOSS_TOLERANCE = 1e-2


def document_lengths(total: int, seed: int) -> list[int]:
    """Unequal documents, a 1-token one and one longer than a flex block among them."""
    rng = np.random.default_rng(seed)
    lengths = [1, 7, 130]
    while sum(lengths) < total:
        lengths.append(int(rng.integers(50, max(51, total // 3))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def skipped_positions(lengths: list[int], seed: int) -> np.ndarray:
    """Per document: positions that increase by 1 inside segments and jump at a few
    random boundaries (SkipAlign), starting at 0."""
    rng = np.random.default_rng(seed + 1)
    parts = []
    for n in lengths:
        steps = np.ones(n, dtype=np.int64)
        steps[0] = 0
        if n > 8:
            jumps = rng.choice(np.arange(1, n), size=min(3, n - 1), replace=False)
            steps[jumps] += rng.integers(1, 4 * n, size=jumps.size)
        parts.append(np.cumsum(steps))
    return np.concatenate(parts)


def build_model(backend: str, dtype: Any, device: Any, state: dict | None, vocab: int):
    import torch
    from megatron.core.transformer.module import Float16Module

    from megatron_longalign.config.model import ModelConfig
    from megatron_longalign.model import build_gpt_model
    from megatron_longalign.model.config import to_transformer_config

    model_config = ModelConfig(
        name="backend-check",
        num_layers=4,
        hidden_size=512,
        ffn_hidden_size=1376,
        num_attention_heads=8,
        num_query_groups=2,  # GQA 4:1
        vocab_size=vocab,
        max_position_embeddings=1 << 20,
        attention_backend=backend,
    )
    bf16 = dtype == torch.bfloat16
    transformer_config = to_transformer_config(
        model_config,
        bf16=bf16,
        params_dtype=torch.float32,
        calculate_per_token_loss=True,
        use_cpu_initialization=True,
    )
    torch.manual_seed(1234)
    model = build_gpt_model(model_config, transformer_config=transformer_config)
    if state is not None:
        model.load_state_dict(state)  # every variant starts from the same weights
    model = model.to(device)
    if bf16:
        model = Float16Module(transformer_config, model)
    return model


def run_variant(
    backend: str, dtype: Any, device: Any, state: dict | None, batch: dict, vocab: int
) -> dict[str, Any]:
    """Loss (mean NLL) and the flattened fp64 gradient of every parameter."""
    import torch

    from megatron_longalign.model.attention import packed_seq_params_from

    model = build_model(backend, dtype, device, state, vocab)
    cu = torch.tensor(batch["cu_seqlens"], dtype=torch.int32, device=device)
    inputs = {
        "input_ids": torch.as_tensor(batch["tokens"], device=device)[None],
        "position_ids": torch.as_tensor(batch["positions"], device=device)[None],
        "labels": torch.as_tensor(batch["labels"], device=device)[None],
        "packed_seq_params": packed_seq_params_from(cu, batch["max_seqlen"]),
    }
    nll = model(**inputs)
    loss = nll.float().mean()
    loss.backward()
    grads = torch.cat(
        [p.grad.detach().double().flatten().cpu() for p in model.parameters() if p.grad is not None]
    )
    return {"loss": float(loss), "grads": grads, "resolved": backend}


def relative_error(x: Any, ref: Any) -> float:
    import torch

    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tokens", type=int, default=8192, help="packed tokens")
    parser.add_argument("--backends", default="flex,sdpa")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import torch

    from megatron_longalign.config.parallel import ParallelConfig
    from megatron_longalign.parallel.distributed import initialize_distributed

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU; none is available", file=sys.stderr)
        return 2
    initialize_distributed(ParallelConfig(), seed=0, cpu=not cuda)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    lengths = document_lengths(args.tokens, args.seed)
    rng = np.random.default_rng(args.seed + 2)
    batch = {
        "tokens": rng.integers(0, args.vocab, args.tokens),
        "labels": rng.integers(0, args.vocab, args.tokens),
        "positions": skipped_positions(lengths, args.seed),
        "cu_seqlens": [0, *np.cumsum(lengths).tolist()],
        "max_seqlen": max(lengths),
    }
    reference_model = build_model("sdpa", torch.float32, torch.device("cpu"), None, args.vocab)
    state = reference_model.state_dict()
    del reference_model
    reference = run_variant("sdpa", torch.float32, device, state, batch, args.vocab)
    backends = [b for b in args.backends.split(",") if b]
    rows = []
    for backend in backends:
        for dtype in (torch.bfloat16, torch.float32):
            if backend == "sdpa" and dtype == torch.float32:
                continue  # that is the reference
            got = run_variant(backend, dtype, device, state, batch, args.vocab)
            rows.append(
                {
                    "backend": backend,
                    "dtype": str(dtype).replace("torch.", ""),
                    "loss": got["loss"],
                    "loss_rel_diff": abs(got["loss"] - reference["loss"]) / abs(reference["loss"]),
                    "grad_rel_error": relative_error(got["grads"], reference["grads"]),
                }
            )
    failures = judge(rows)
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "tokens": args.tokens,
        "documents": len(lengths),
        "max_position": int(batch["positions"].max()),
        "reference_loss": reference["loss"],
        "rows": rows,
        "failures": failures,
    }
    print(
        f"\nbackend check on {report['device']}: {args.tokens} tokens in {len(lengths)} "
        f"documents, positions up to {report['max_position']}, reference sdpa fp32 "
        f"loss {reference['loss']:.5f}"
    )
    print(f"{'backend':>8} {'dtype':>9} {'loss':>9} {'loss rel':>9} {'grad rel err':>13}")
    for row in rows:
        print(
            f"{row['backend']:>8} {row['dtype']:>9} {row['loss']:>9.5f} "
            f"{row['loss_rel_diff']:>9.2e} {row['grad_rel_error']:>13.3e}"
        )
    for failure in failures:
        print(f"FAIL: {failure}")
    if args.output_json:
        args.output_json.write_text(json.dumps(report, indent=1))
    return 1 if failures else 0


def judge(rows: list[dict[str, Any]]) -> list[str]:
    """The tolerances of the module docstring, applied to every row."""
    failures = []
    bf16_sdpa = [r["grad_rel_error"] for r in rows if r["backend"] == "sdpa"]
    for row in rows:
        name = f"{row['backend']} {row['dtype']}"
        if not np.isfinite(row["loss"]) or row["loss_rel_diff"] > LOSS_TOLERANCE:
            failures.append(f"{name}: loss differs by {row['loss_rel_diff']:.2e} relative")
        if row["dtype"] == "float32":
            limit = FP32_TOLERANCE
        elif bf16_sdpa:
            limit = BF16_SLACK * bf16_sdpa[0] + BF16_FLOOR
        else:
            limit = 1e-2
        if not row["grad_rel_error"] <= limit:  # NaN fails too
            failures.append(f"{name}: gradient error {row['grad_rel_error']:.3e} > {limit:.3e}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
