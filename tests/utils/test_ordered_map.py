"""ordered_map: order is kept, and the input is consumed lazily (bounded memory)."""

from __future__ import annotations

from megatron_longalign.utils.ordered_map import ordered_map


def square(x: int) -> int:
    return x * x


def test_results_come_back_in_input_order():
    items = list(range(50))
    assert list(ordered_map(square, items, workers=2)) == [x * x for x in items]
    assert list(ordered_map(square, items, workers=1)) == [x * x for x in items]


def test_input_is_consumed_lazily():
    pulled = []

    def source():
        for i in range(1000):
            pulled.append(i)
            yield i

    results = ordered_map(square, source(), workers=2, max_in_flight=3)
    assert next(results) == 0
    # One result consumed: at most max_in_flight items were ever submitted.
    assert len(pulled) <= 3
    assert next(results) == 1 and len(pulled) <= 4
    results.close()
