"""The forward-only scoring engine: per-token NLL (and optionally attention mass) of
documents under a checkpoint, at the job's TP / PP / CP layout.

    initialize_distributed(config.parallel, seed=0)
    engine = ScoringEngine(config, "ckpt/")
    results = engine.score(documents)      # same results on every rank of the replica

How a call runs (every rank of one model-parallel replica passes the same documents):
1. documents are packed into THD micro-batches of at most seq_length tokens
   (scoring/documents.py) with the trainer's builder, and cut to this CP rank's share;
2. megatron's schedule runs them forward only (`get_forward_backward_func`, so pipeline
   stages pass activations as in training); the last stage's loss function receives the
   per-token NLL of the chunked loss (every TP rank of it holds the full NLL: the loss
   all-reduces over TP);
3. the last stage all-gathers its CP ranks' shares into each micro-batch's token layout
   and broadcasts the layout NLL to the other pipeline stages;
4. each document's NLL is read out of its micro-batch and shifted to "index t = token t"
   (documents.py), in input order.

Attention probe (GATEAU's attention mass): when a document has probe_query_mask, its
micro-batch's forward runs inside `attach_probe` with a ProbeRequest in the micro-batch's
layout, and the probe's result is summed over the TP, CP and PP groups (heads, queries
and layers are split over them) so every rank gets the same masses.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_longalign.config.training import LongAlignConfig
from megatron_longalign.data.microbatch import MicroBatch, shard_for_context_parallel
from megatron_longalign.data.tokenizer import TokenizerError, tokenizer_fingerprint
from megatron_longalign.parallel.context_parallel import (
    context_parallel_token_index,
    document_multiple,
)
from megatron_longalign.scoring.documents import (
    DocumentResult,
    ProbePlan,
    ScoringDocument,
    build_microbatch,
    check_documents,
    document_token_nll,
    microbatch_builder,
    plan_microbatches,
    probe_plan,
)
from megatron_longalign.training.builders import build_inference_model, default_device
from megatron_longalign.training.checkpoint import read_marker, resolve_checkpoint


class ScoringError(RuntimeError):
    """The scoring model cannot be built (e.g. its checkpoint does not load)."""


class ScoringEngine:
    def __init__(
        self,
        config: LongAlignConfig,
        checkpoint: str | Path,
        *,
        seq_length: int | None = None,
        probe_layers: tuple[int, ...] | None = None,
    ) -> None:
        """Forward-only model of `checkpoint` (a checkpoint directory or a root with
        `latest`, saved at any layout) at the config's TP/PP/CP layout. Collective; call
        after `initialize_distributed`. Micro-batches hold at most `seq_length` tokens
        (default data.seq_length); a longer document gets one of its own."""
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise ScoringError("ScoringEngine needs initialize_distributed() first")
        self.config = config
        self.seq_length = int(seq_length or config.data.seq_length)
        self.probe_layers = probe_layers
        self.device = default_device()
        self.checkpoint, self.model = self._load(checkpoint)
        self._record = read_marker(self.checkpoint).get("extra", {})
        self._check_vocab(config.model.vocab_size)
        parallel = config.parallel
        self.cp_size = parallel.context_parallel_size
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.document_multiple = document_multiple(
            config.data.pad_documents_to_multiple_of, self.cp_size
        )
        # Sequence parallelism splits each CP rank's tokens again over TP.
        sp = parallel.tensor_model_parallel_size * self.cp_size if parallel.sequence_parallel else 1
        self.pad_to_multiple_of = math.lcm(
            config.data.pad_to_multiple_of, self.document_multiple, sp
        )

    def _load(self, checkpoint: str | Path) -> tuple[Path, list[torch.nn.Module]]:
        try:
            path = resolve_checkpoint(checkpoint)
            return path, build_inference_model(self.config, path, device=self.device)
        except Exception as err:
            raise ScoringError(
                f"cannot load the scoring model from checkpoint {str(checkpoint)!r}: {err}"
            ) from err

    def _check_vocab(self, vocab_size: int) -> None:
        """A checkpoint recording another vocabulary would load (vocab padding hides the
        shape difference) and score garbage: refuse it."""
        saved = (self._record.get("model_config") or {}).get("vocab_size")
        if saved is None:
            saved = ((self._record.get("hf_import") or {}).get("model_config") or {}).get(
                "vocab_size"
            )
        if saved is not None and int(saved) != vocab_size:
            raise ScoringError(
                f"checkpoint {self.checkpoint} records vocab_size {saved}, but "
                f"model.vocab_size is {vocab_size}"
            )

    @property
    def vocab_size(self) -> int:
        """The model's real (unpadded) vocabulary: documents' token ids lie below it."""
        return self.config.model.vocab_size

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str | None:
        """The fingerprint of the tokenizer of the HF model the checkpoint was imported
        from (tools/convert_hf.py records its directory, followed through
        train.init_from), by data/tokenizer.py's definition, so it equals the
        `tokenizer.sha256` of data preprocessed with that tokenizer. None when the
        checkpoint records no import or the directory holds no tokenizer any more."""
        record = self._record.get("hf_import") or {}
        hf_dir = record.get("hf_dir")
        if not hf_dir:
            return None
        try:
            return tokenizer_fingerprint(hf_dir)
        except TokenizerError:
            return None

    def score(self, documents: Sequence[ScoringDocument]) -> list[DocumentResult]:
        """Per-token NLL (and attention mass for probed documents), in input order.
        Collective over the model-parallel group (TP x CP x PP of this DP replica): every
        rank passes the same documents and gets the same results."""
        documents = list(documents)
        check_documents(documents, self.vocab_size)
        if not documents:
            return []
        lengths = [int(np.asarray(d.tokens).size) for d in documents]
        groups = plan_microbatches(
            lengths, self.seq_length, self.document_multiple, self.config.data.packing.algorithm
        )
        builder = microbatch_builder(documents, self.document_multiple, self.pad_to_multiple_of)
        whole = [build_microbatch(documents, g, builder) for g in groups]
        probes = [
            probe_plan(documents, g, mb.layout_cu_seqlens, self.probe_layers)
            for g, mb in zip(groups, whole, strict=True)
        ]
        local = [shard_for_context_parallel(mb, self.cp_size, self.cp_rank) for mb in whole]
        attached = [None if plan is None else _new_probe(plan) for plan in probes]
        local_nll = self._forward(local, attached)
        layout_nll = self._layout_nll(whole, local_nll)
        masses = self._probe_results(attached)
        results: list[DocumentResult | None] = [None] * len(documents)
        for g, mb, nll, plan, mass in zip(groups, whole, layout_nll, probes, masses, strict=True):
            for slot, index in enumerate(g.tolist()):
                doc = documents[index]
                token_nll = document_token_nll(nll, mb.layout_cu_seqlens, slot, doc)
                results[index] = DocumentResult(doc.key, token_nll, _mass_of(plan, mass, slot, doc))
        return results  # type: ignore[return-value]  # every index filled above

    # ---- the forward pass ----------------------------------------------------------------

    def _forward(
        self, microbatches: list[MicroBatch], probes: list[Any]
    ) -> dict[int, torch.Tensor]:
        """Megatron's schedule, forward only. Returns, on the last pipeline stage, each
        micro-batch's NLL of this CP rank's tokens (float32 [T_local]); {} elsewhere."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        collected: dict[int, torch.Tensor] = {}
        step = functools.partial(self._forward_step, probes, collected)
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=step,
                data_iterator=iter(enumerate(microbatches)),
                model=self.model,
                num_microbatches=len(microbatches),
                # Only for fixed pipeline shapes; THD stages exchange shapes instead.
                seq_length=max(mb.num_tokens for mb in microbatches),
                micro_batch_size=1,
                forward_only=True,
            )
        return collected

    def _forward_step(
        self,
        probes: list[Any],
        collected: dict[int, torch.Tensor],
        data_iterator: Iterator[tuple[int, MicroBatch]],
        model: torch.nn.Module,
    ):
        """megatron forward_step_func. Every stage builds the inputs (positions and
        cu_seqlens are needed everywhere); the probe sees this stage's layers only."""
        from megatron_longalign.model import model_inputs

        index, microbatch = next(data_iterator)
        inputs = model_inputs(microbatch, self.device)
        probe = probes[index]
        with _attached(model, probe):
            output = model(**inputs)
        return output, functools.partial(_collect_nll, collected, index)

    def _layout_nll(
        self, whole: list[MicroBatch], local: dict[int, torch.Tensor]
    ) -> list[np.ndarray]:
        """Each micro-batch's NLL over its whole token layout, on every rank: CP shares
        gathered on the last stage, then broadcast from it over the pipeline group."""
        from megatron.core import parallel_state as ps

        sizes = [int(mb.layout_cu_seqlens[-1]) for mb in whole]
        flat = torch.empty(sum(sizes), dtype=torch.float32, device=self.device)
        if ps.is_pipeline_last_stage():
            parts = [_cp_gather(mb, local[i], self.cp_size) for i, mb in enumerate(whole)]
            flat = torch.cat(parts)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(
                flat,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
        return list(np.split(flat.cpu().numpy(), np.cumsum(sizes)[:-1]))

    def _probe_results(self, probes: list[Any]) -> list[np.ndarray | None]:
        """Each probe's masses, its partial sums added over TP (heads), CP (queries) and
        PP (layers). Collective: every rank holds probes for the same micro-batches."""
        from megatron.core import parallel_state as ps

        groups = [
            group
            for group, size in (
                (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()),
                (ps.get_context_parallel_group(), ps.get_context_parallel_world_size()),
                (
                    ps.get_pipeline_model_parallel_group(),
                    ps.get_pipeline_model_parallel_world_size(),
                ),
            )
            if size > 1
        ]
        return [None if probe is None else probe.result(groups) for probe in probes]


# ---- helpers -------------------------------------------------------------------------------


def _collect_nll(collected: dict[int, torch.Tensor], index: int, token_nll: torch.Tensor):
    """megatron loss_func on the last stage: keep the per-token NLL [1, T_local]. The
    returned loss is only what the schedule's bookkeeping expects (nothing backpropagates)."""
    nll = token_nll.detach().float().reshape(-1)
    collected[index] = nll
    return nll.sum(), torch.tensor(nll.numel(), dtype=torch.int, device=nll.device), {}


def _cp_gather(microbatch: MicroBatch, local: torch.Tensor, cp_size: int) -> torch.Tensor:
    """The whole micro-batch's layout NLL from every CP rank's share (each holds chunks
    r and 2CP-1-r of every document; parallel/context_parallel.py)."""
    if cp_size == 1:
        return local
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(local) for _ in range(cp_size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=ps.get_context_parallel_group())
    layout = microbatch.layout_cu_seqlens
    full = local.new_empty(int(layout[-1]))
    for rank, part in enumerate(parts):
        index = torch.as_tensor(context_parallel_token_index(layout, cp_size, rank))
        full[index.to(full.device)] = part
    return full


def _new_probe(plan: ProbePlan) -> Any:
    from megatron_longalign.model.attention_probe import AttentionProbe

    return AttentionProbe(plan.request)


def _attached(model: torch.nn.Module, probe: Any) -> contextlib.AbstractContextManager:
    if probe is None:
        return contextlib.nullcontext()
    from megatron_longalign.model.attention_probe import attach_probe

    return attach_probe([model], probe)


def _mass_of(
    plan: ProbePlan | None, mass: np.ndarray | None, slot: int, doc: ScoringDocument
) -> np.ndarray | None:
    """Document `slot`'s segment masses out of its micro-batch's probe result."""
    if plan is None or mass is None or slot not in plan.segment_offsets:
        return None
    first = plan.segment_offsets[slot]
    return np.asarray(mass[first : first + doc.num_segments], dtype=np.float64)
