#!/usr/bin/env python
"""Memory and time of `tools/convert_hf.py import/export` on a random Llama-shaped model,
against a naive import that loads the whole HF state dict before filling the model, in
one run on this machine.

Each measurement runs in its own child process, which reports its peak resident memory
(VmHWM) and wall time; "above baseline" subtracts the peak of a child that only
imports the same modules and builds the same (empty) megatron model, so what is left is
what the conversion itself holds. Streaming should hold about one model in its dtype
(plus one HF tensor); the naive import holds the model and the whole state dict.

    python bench/convert_bench.py                 # ~0.5B parameters, bf16 (~1 GB)
    python bench/convert_bench.py --hidden 1024 --layers 4   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def make_hf_model(directory: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random bf16 Llama (GQA 4:1, SwiGLU 8/3 h) saved in 4 safetensors shards;
    returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=(8 * hidden // 3 + 127) // 128 * 128,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        vocab_size=vocab,
        max_position_embeddings=4096,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    shard = max(1, count * 2 // 4)  # bytes: about 4 shards
    model.save_pretrained(directory, max_shard_size=shard)
    return count


# ---- child processes ------------------------------------------------------------------


def _report(started: float) -> None:
    from megatron_longalign.utils.memory import peak_rss_bytes

    # The child's own peak (VmHWM), not one inherited from this parent (utils/memory.py).
    peak = peak_rss_bytes()
    print(json.dumps({"peak_bytes": peak, "seconds": time.perf_counter() - started}))


def child_baseline(hf_dir: str) -> None:
    """Imports and an empty process group, like the converters, and the model built
    on the meta device: the fixed cost every measurement shares."""
    started = time.perf_counter()
    import torch

    from megatron_longalign.config.parallel import ParallelConfig
    from megatron_longalign.convert.hf_config import config_from_hf
    from megatron_longalign.convert.hf_import import read_hf_config
    from megatron_longalign.convert.model_io import build_stage_model  # noqa: F401
    from megatron_longalign.parallel.distributed import initialize_distributed

    initialize_distributed(ParallelConfig(), seed=0, cpu=True)
    config_from_hf(read_hf_config(Path(hf_dir)))
    torch.empty(0)
    _report(started)


def child_naive_import(hf_dir: str) -> None:
    """What a converter without streaming does: every shard into one state dict, then
    the model built and filled from it."""
    started = time.perf_counter()
    import torch
    from safetensors.torch import load_file

    from megatron_longalign.config.parallel import ParallelConfig
    from megatron_longalign.convert.hf_config import config_from_hf
    from megatron_longalign.convert.hf_import import read_hf_config
    from megatron_longalign.convert.model_io import build_stage_model
    from megatron_longalign.parallel.distributed import initialize_distributed

    initialize_distributed(ParallelConfig(), seed=0, cpu=True)
    state = {}
    for shard in sorted(Path(hf_dir).glob("*.safetensors")):
        # clone(): in memory, as torch.load of a .bin or a transformers model would hold it
        # (load_file's tensors may still be backed by the file mapping).
        state.update({k: v.clone() for k, v in load_file(shard).items()})
    config = config_from_hf(read_hf_config(Path(hf_dir)))
    model = build_stage_model(config, torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():  # filled (touched), as a real import would
            param.zero_()
    del model, state
    _report(started)


def child_cli(args: list[str]) -> None:
    started = time.perf_counter()
    import runpy

    sys.argv = ["tools/convert_hf.py", *args]
    try:
        runpy.run_path(str(REPO / "tools" / "convert_hf.py"), run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    _report(started)


def run_child(kind: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- main -----------------------------------------------------------------------------


def main() -> int:
    if sys.argv[1:2] == ["--child"]:  # a measurement: --child KIND ARGS... (run_child)
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "cli":
            child_cli(rest)
        else:
            {"baseline": child_baseline, "naive": child_naive_import}[kind](rest[0])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="convert_bench_") as tmp:
        work = Path(tmp)
        hf_dir = work / "hf"
        params = make_hf_model(hf_dir, args.hidden, args.layers, args.vocab)
        model_bytes = 2 * params
        rows = {
            "baseline": run_child("baseline", str(hf_dir)),
            "naive import": run_child("naive", str(hf_dir)),
            "import (streaming)": run_child(
                "cli",
                "import",
                "--hf-dir",
                str(hf_dir),
                "--output",
                str(work / "ckpt"),
                "--dtype",
                "bf16",
                "--no-progress",
            ),
            "export (streaming)": run_child(
                "cli",
                "export",
                "--checkpoint",
                str(work / "ckpt"),
                "--output",
                str(work / "hf_out"),
                "--max-shard-size",
                "300MB",
                "--no-progress",
            ),
        }
    base = rows["baseline"]["peak_bytes"]
    print(
        f"{platform.machine()} {os.cpu_count()} cores; model {params / 1e9:.2f}B parameters "
        f"= {model_bytes / GB:.2f} GB in bf16"
    )
    print(f"{'':<20}{'peak GB':>9}{'above baseline':>16}{'x model':>9}{'seconds':>9}")
    for name, row in rows.items():
        above = row["peak_bytes"] - base
        print(
            f"{name:<20}{row['peak_bytes'] / GB:>9.2f}{above / GB:>16.2f}"
            f"{above / model_bytes:>9.2f}{row['seconds']:>9.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
