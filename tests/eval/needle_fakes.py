"""A fake Generator for needle tests (the eval.generation.Generator protocol), whose
answer depends on where the needle sits in the prompt, so a heatmap has structure and
its scores can be worked out by hand:

- the needle starting in the first 45% of the prompt (by characters): the needle
  sentence (recall 1);
- starting before 75%: "You should eat a sandwich." (recall 1/3);
- later, or absent: "I could not find it." (recall 0).
"""

from __future__ import annotations

from megatron_longalign.eval.generation import Generation
from megatron_longalign.eval.needle import NEEDLE

FULL, PARTIAL, NOTHING = NEEDLE, "You should eat a sandwich.", "I could not find it."


def fake_answer(prompt: str) -> str:
    where = prompt.find(NEEDLE)
    if where < 0:
        return NOTHING
    fraction = where / len(prompt)
    return FULL if fraction < 0.45 else PARTIAL if fraction < 0.75 else NOTHING


class FakeGenerator:
    """Answers with `fake_answer`; counts the requests it got; `fail_after` raises
    after yielding that many generations (a killed run)."""

    def __init__(self, tokenizer_path: str, fail_after: int | None = None) -> None:
        self.tokenizer_path = tokenizer_path
        self.fail_after = fail_after
        self.requested: list[str] = []
        self.closed = False

    def generate(self, requests, *, desc=None):
        for count, request in enumerate(requests):
            if self.fail_after is not None and count >= self.fail_after:
                raise RuntimeError("killed")
            self.requested.append(request.key)
            text = fake_answer(request.prompt)
            yield Generation(request.key, text, len(request.prompt.split()), len(text.split()), 0)

    def close(self) -> None:
        self.closed = True
