"""Structured configs for the data pipeline (Hydra `data` group from issue 4 on).

Units: in `packed` batching a *unit* is a pack of documents (at most `seq_length`
tokens); in `sorted` and `naive` batching a unit is one sample. `micro_batch_size` and
`global_batch_size` count units, as Megatron counts sequences.

The schema only: the rules are `data_problems` (data/planner.py) and `skipalign_problems`
(data/positions.py), called by the start-up validator (training/validate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BATCHING_MODES = ("packed", "sorted", "naive")
LOSS_REDUCTIONS = ("token", "sequence", "sqrt")
OVERLENGTH_ACTIONS = ("error", "drop")
# megatron_longalign/data/packing.py
PACKING_ALGORITHMS = ("next_fit", "first_fit_decreasing", "best_fit_decreasing")
# SkipAlign boundary rules (megatron_longalign/data/positions.py, docs/SKIPALIGN.md)
BOUNDARY_KINDS = ("turn", "context")


@dataclass
class SkipAlignConfig:
    enabled: bool = False
    target_context_length: int = 65536
    boundaries: tuple[str, ...] = ("turn", "context")
    probability: float = 1.0  # fraction of samples that get skips (decided per sample)
    min_segment_tokens: int = 1  # boundaries that would leave a shorter segment are ignored


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
    # One dataset in one line: `data=single data.prefix=P` (conf/data/single.yaml makes P
    # the only source, weight 1). Other data configs list data.sources and leave it "".
    prefix: str = ""
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
    # Held-out data for validation during training (training/validation.py,
    # docs/TRAINING.md "Validation"): other preprocessed sets (every sample once; their
    # weight must stay 1.0), OR this fraction of the training sources' samples, chosen
    # by a hash of each sample's index within its dataset (data/holdout.py), so the split
    # is the same for any seed, data-parallel size and order. 0.0: no held-out split.
    valid_sources: list[DatasetSource] = field(default_factory=list)
    valid_fraction: float = 0.0
