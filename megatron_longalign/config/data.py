"""Structured configs for the data pipeline (Hydra `data` group from issue 4 on).

Units: in `packed` batching a *unit* is a pack of documents (at most `seq_length`
tokens); in `sorted` and `naive` batching a unit is one sample. `micro_batch_size` and
`global_batch_size` count units, as Megatron counts sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_longalign.data.positions import SkipAlignConfig

BATCHING_MODES = ("packed", "sorted", "naive")
LOSS_REDUCTIONS = ("token", "sequence", "sqrt")
OVERLENGTH_ACTIONS = ("error", "drop")


@dataclass
class DatasetSource:
    """One preprocessed dataset (`tools/preprocess.py --output-prefix`) in the mix.

    `weight` is a per-epoch sampling multiplier: each epoch takes round(weight * size)
    samples of it (whole copies first, the fractional part drawn without replacement), so
    weight 1.0 means every sample exactly once per epoch."""

    prefix: str
    weight: float = 1.0


@dataclass
class PackingConfig:
    # next_fit (LongAlign's), first_fit_decreasing or best_fit_decreasing
    algorithm: str = "best_fit_decreasing"


@dataclass
class DataConfig:
    sources: list[DatasetSource] = field(default_factory=list)
    seq_length: int = 65536
    batching: str = "packed"
    packing: PackingConfig = field(default_factory=PackingConfig)
    micro_batch_size: int = 1
    global_batch_size: int = 8
    # Pad every micro-batch to a multiple of this with a zero-weight pseudo-document
    # (sequence/context parallelism need it; 1 = no padding).
    pad_to_multiple_of: int = 1
    # Pad every document to a multiple of this with zero-weight tokens after its end
    # (layout only: positions and losses of real tokens are unchanged). Context
    # parallelism raises it to a multiple of 2 x CP by itself; packs count padded lengths.
    pad_documents_to_multiple_of: int = 1
    # Samples longer than seq_length: stop with an error (default), or drop and count them.
    on_overlength: str = "error"
    # Rank balancing cost of a document of L tokens: L + L^2 / attention_equiv_length, i.e.
    # the length at which causal attention costs as much as the linear layers. For N
    # parameters, n_layers layers and hidden size h it is about N / (n_layers * h):
    # ~50k for a 7B Llama.
    attention_equiv_length: int = 50000
    skipalign: SkipAlignConfig = field(default_factory=SkipAlignConfig)
    seed: int = 1234

    def validate(self, dp_size: int = 1) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"data config: {message}")

        if not self.sources:
            fail("no dataset sources (data.sources is empty)")
        if self.batching not in BATCHING_MODES:
            fail(f"data.batching={self.batching!r}; choose one of {BATCHING_MODES}")
        from megatron_longalign.data.packing import PACKING_ALGORITHMS

        if self.packing.algorithm not in PACKING_ALGORITHMS:
            fail(
                f"data.packing.algorithm={self.packing.algorithm!r}; choose one of {PACKING_ALGORITHMS}"
            )
        if self.on_overlength not in OVERLENGTH_ACTIONS:
            fail(f"data.on_overlength={self.on_overlength!r}; choose one of {OVERLENGTH_ACTIONS}")
        if self.seq_length < 2:
            fail("data.seq_length must be >= 2")
        if (
            self.micro_batch_size < 1
            or self.pad_to_multiple_of < 1
            or self.pad_documents_to_multiple_of < 1
        ):
            fail(
                "data.micro_batch_size, data.pad_to_multiple_of and "
                "data.pad_documents_to_multiple_of must be >= 1"
            )
        if self.global_batch_size % (self.micro_batch_size * dp_size):
            fail(
                f"data.global_batch_size ({self.global_batch_size}) must be divisible by "
                f"micro_batch_size ({self.micro_batch_size}) x data-parallel size ({dp_size})"
            )
        if self.seq_length % self.pad_to_multiple_of:
            fail(
                f"data.seq_length ({self.seq_length}) must be a multiple of "
                f"pad_to_multiple_of ({self.pad_to_multiple_of})"
            )
        try:
            self.skipalign.validate()
        except ValueError as err:
            fail(f"data.skipalign: {err}")
        for source in self.sources:
            if source.weight < 0:
                fail(f"dataset {source.prefix}: weight must be >= 0, got {source.weight}")
