"""Packing under pipeline parallelism: a packed micro-batch at PP = 2 gives every
document the losses and gradient it gets alone, so document boundaries (cu_seqlens)
and explicit position ids survive both stages, forward and backward.

workers/pipeline_documents.py runs the packs (odd lengths, 1- and 2-token documents,
SkipAlign position jumps) through megatron's schedule on two ranks; the reference is
every document alone (cu_seqlens [0, L]) on one rank with plain autograd. tests/model/
test_gpt.py covers packed vs unpacked at PP = 1.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import run_and_read

pytestmark = pytest.mark.slow

# Per-token losses are ~7 and agree to ~1e-6 (fp32, different summation order in a
# packed matmul). A leak across a boundary moves them by > 0.2 (see
# test_dropped_boundaries_are_detected), so 1e-5 is far from either.
LOSS_ATOL = 1e-5
# Gradients of a sum over ~80 tokens reach ~13 and agree to ~1e-6 of that scale.
GRAD_RELATIVE_TOLERANCE = 1e-5
# How far a leak must land outside LOSS_ATOL for the comparison to count as sensitive.
LEAK_MARGIN = 1000


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    (result,) = run_and_read("pipeline_documents.py", 1, tmp_path_factory.mktemp("pp1"))
    return result


@pytest.fixture(scope="module")
def pp2(tmp_path_factory) -> list[dict]:
    results = run_and_read(
        "pipeline_documents.py", 2, tmp_path_factory.mktemp("pp2"), ["--pp", "2"]
    )
    assert [r["pp_rank"] for r in results] == [0, 1]
    return results


def last_stage(results: list[dict]) -> dict:
    (result,) = [r for r in results if r["last_stage"]]
    return result


def merged_grads(results: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Union over pipeline stages of the full-shape gradients (TP rank 0 writes them)."""
    grads = {}
    for result in results:
        grads.update({k: torch.tensor(v) for k, v in result[key].items()})
    return grads


def _named(name: str):
    """assert_close `msg` that keeps torch's mismatch report, prefixed by the name."""
    return lambda message: f"{name}: {message}"


def assert_losses_close(actual: dict[str, list], expected: dict[str, list]) -> None:
    """Per document: the per-token losses and their sum (the document's loss)."""
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got, want = torch.tensor(actual[name]), torch.tensor(want)
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=0, atol=LOSS_ATOL, msg=_named(name))
        torch.testing.assert_close(
            got.sum(), want.sum(), rtol=0, atol=LOSS_ATOL * want.numel(), msg=_named(name)
        )


def assert_grads_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        scale = want.abs().max().item()
        assert scale > 0, name  # every parameter takes part
        atol = GRAD_RELATIVE_TOLERANCE * max(1.0, scale)
        torch.testing.assert_close(actual[name], want, rtol=0, atol=atol, msg=_named(name))


def test_every_document_is_checked(reference, pp2):
    names = [name for pack in reference["documents"] for name in pack]
    assert len(names) == 11 and {"b1", "d2", "e1", "h1", "skip21"} <= set(names)
    assert set(reference["alone_plain"]) == set(last_stage(pp2)["packed"]) == set(names)
    # Two stages, two layers each: the first stage embeds, the last one projects.
    first, last = (set(r["grads"]) for r in pp2)
    assert not first & last
    assert {k.split(".")[2] for k in first if k.startswith("decoder.layers.")} == {"0", "1"}
    assert {k.split(".")[2] for k in last if k.startswith("decoder.layers.")} == {"2", "3"}
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" in last


def test_packed_pp2_losses_equal_each_document_alone(reference, pp2):
    assert_losses_close(last_stage(pp2)["packed"], reference["alone_plain"])


def test_packed_pp2_gradient_equals_sum_over_documents_alone(reference, pp2):
    # main_grad of the summed token losses of all packs, vs the plain-autograd
    # gradient accumulated over every document run alone.
    assert_grads_close(merged_grads(pp2, "grads"), merged_grads([reference], "grads"))


def test_documents_alone_through_pp2_schedule_match_plain_autograd(reference, pp2):
    # The schedule itself with one document per micro-batch: isolates a failure of
    # the tests above to packing rather than to the pipeline plumbing.
    assert_losses_close(last_stage(pp2)["alone_pp"], reference["alone_plain"])
    assert_grads_close(merged_grads(pp2, "alone_pp_grads"), merged_grads([reference], "grads"))


def test_dropped_boundaries_are_detected(reference, pp2):
    """Negative control: with cu_seqlens [0, T] every document but the first of its
    pack attends to the ones before it, and its losses must miss the reference by far
    more than LOSS_ATOL. The first document of a pack cannot see a leak."""
    leaky = last_stage(pp2)["leaky"]
    for pack in reference["documents"]:
        first, *later = pack
        want = torch.tensor(reference["alone_plain"][first])
        torch.testing.assert_close(torch.tensor(leaky[first]), want, rtol=0, atol=LOSS_ATOL)
        for name in later:
            miss = (torch.tensor(leaky[name]) - torch.tensor(reference["alone_plain"][name])).abs()
            assert miss.max().item() > LEAK_MARGIN * LOSS_ATOL, name
