"""Needle in a haystack (THUDM/LongAlign's Needle_test, with the needle placed by text).

For each context length L (tokens of the model's tokenizer) and depth d (%), a context of
L tokens is cut from the haystack (eval/haystack.py) with the needle sentence inserted at
the start of the sentence holding token d% of it; the model gets

    <context>\\n\\nRead the document and answer: <question> Here is the most relevant
    sentence in the context:

(LongAlign's user prompt) and its answer is scored by key-phrase recall, or by an LLM judge
when --judge-base-url and --judge-model are given (eval/needle_scoring.py).

Context length: L counts the context only (haystack + needle, encoded alone); the
instruction and question (about 30 tokens) and the chat template come on top. So
L + that overhead must fit the model: when --max-length is set and the largest L plus the
question does not fit, the run stops with an error before generating (the backend would
otherwise cut the middle of the haystack, needle included). Any case the backend still
truncated (template tokens) is flagged in results.jsonl and counted in the summary.

Outputs in --output: results.jsonl (one record per (length, depth), appended as each
finishes; a rerun skips finished keys, including unparsed judge cases), scores.csv,
heatmap.png, summary.json, settings.json (a rerun with another needle, haystack,
tokenizer or scorer is refused: use a new --output).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_longalign.data.tokenizer import TextTokenizer, load_tokenizer
from megatron_longalign.eval import haystack as hs
from megatron_longalign.eval.judge import (
    JudgeOptionsError,
    add_judge_arguments,
    judge_client_from_args,
)
from megatron_longalign.eval.needle_grid import GridError, case_key, depth_grid, length_grid
from megatron_longalign.eval.needle_report import log_to_wandb, write_report
from megatron_longalign.eval.needle_scoring import judge_answer, phrase_recall
from megatron_longalign.utils.atomic_files import write_text_durably
from megatron_longalign.utils.jsonl_records import RecordAppender, read_records

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
KEY_PHRASES = ("sandwich", "Dolores Park", "sunny day")
PROMPT_TEMPLATE = (
    "{context}\n\nRead the document and answer: {question} "
    "Here is the most relevant sentence in the context:"
)


class NeedleError(ValueError):
    """Bad input to a needle run; the message names the option or file."""


@dataclass
class NeedleSettings:
    output: Path
    lengths: list[int]
    depths: list[float]
    haystack_dir: Path | None = None  # None: the generated haystack
    seed: int = 0
    needle: str = NEEDLE
    question: str = QUESTION
    key_phrases: tuple[str, ...] = KEY_PHRASES
    max_new_tokens: int = 128
    max_length: int | None = None  # the backend's prompt limit, when known
    model_name: str = "model"
    judge_retries: int = 2
    wandb_project: str | None = None
    base_text: str = field(default="", repr=False)  # the haystack source text, once read

    def validate(self) -> None:
        """Cheap checks, before any model is loaded."""
        missing = [p for p in self.key_phrases if p.casefold() not in self.needle.casefold()]
        if missing:
            raise NeedleError(f"--key-phrases {missing} do not occur in the needle {self.needle!r}")
        if self.max_length is not None and max(self.lengths) > self.max_length:
            raise NeedleError(
                f"--lengths: the longest context ({max(self.lengths)} tokens) exceeds "
                f"--max-length {self.max_length}; drop the longer lengths or raise --max-length"
            )
        if self.haystack_dir is not None:
            self.base_text = hs.read_haystack_dir(self.haystack_dir)

    def identity(self, tokenizer: TextTokenizer, scorer: str) -> dict[str, Any]:
        """What a resumed run must share with the records already written."""
        source = f"dir:{self.haystack_dir}" if self.haystack_dir else f"generated:seed={self.seed}"
        return {
            "needle": self.needle,
            "question": self.question,
            "key_phrases": list(self.key_phrases),
            "haystack": source,
            "tokenizer_sha256": tokenizer.fingerprint,
            "scorer": scorer,
            "prompt_template": PROMPT_TEMPLATE,
        }


@dataclass(frozen=True)
class NeedleCase:
    key: str
    length: int
    depth: float
    prompt: str
    facts: dict[str, Any]  # placement measurements recorded with the result


def build_haystack(settings: NeedleSettings, tokenizer: TextTokenizer) -> hs.IndexedText:
    needed = max(settings.lengths)
    base = settings.base_text or hs.generated_haystack(needed * 6, settings.seed)
    return hs.haystack_with_tokens(tokenizer, base, needed)


def make_case(settings, tokenizer, index: hs.IndexedText, length: int, depth: float) -> NeedleCase:
    """Place the needle for one cell and measure where it really is, in tokens of the
    final context (encoded alone)."""
    needle_tokens = len(tokenizer.encode(" " + settings.needle))
    if length <= needle_tokens:
        raise NeedleError(f"--lengths: {length} tokens cannot hold the needle ({needle_tokens})")
    context = hs.place_needle(index, settings.needle, length - needle_tokens, depth)
    before, inside, total = hs.needle_token_span(tokenizer, context)
    facts = {
        "context_tokens": total,
        "needle_token": before,
        "needle_tokens": inside,
        # the needle's measured depth: tokens before it over the haystack tokens
        "needle_depth": 100.0 * before / max(total - inside, 1),
        "target_token": context.target_token,
    }
    prompt = PROMPT_TEMPLATE.format(context=context.text, question=settings.question)
    return NeedleCase(case_key(length, depth), length, depth, prompt, facts)


def check_fits(settings: NeedleSettings, tokenizer: TextTokenizer) -> None:
    if settings.max_length is None:
        return
    overhead = len(tokenizer.encode(PROMPT_TEMPLATE.format(context="", question=settings.question)))
    if max(settings.lengths) + overhead > settings.max_length:
        raise NeedleError(
            f"--lengths: the longest context ({max(settings.lengths)} tokens) plus the question "
            f"({overhead} tokens) exceeds --max-length {settings.max_length}; the backend would "
            "cut the middle of the haystack. Drop the longer lengths or raise --max-length"
        )


def _check_resume(settings: NeedleSettings, identity: dict[str, Any]) -> dict[str, dict]:
    """The records already written, after checking they come from the same setup."""
    path = settings.output / "settings.json"
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in identity if stored.get(k) != identity[k])
        if changed:
            raise NeedleError(
                f"{path}: this output directory was written with another {', '.join(changed)}; "
                "use a new --output (or delete the directory)"
            )
    else:
        settings.output.mkdir(parents=True, exist_ok=True)
        write_text_durably(path, json.dumps(identity, indent=2) + "\n")
    return {r["key"]: r for r in read_records(settings.output / "results.jsonl")}


def _score(settings: NeedleSettings, judge, answer: str) -> dict[str, Any]:
    if judge is None:
        score, found = phrase_recall(answer, settings.key_phrases)
        return {"score": score, "status": "scored", "scorer": "recall", "found": found}
    judgement = judge_answer(
        judge, settings.question, settings.needle, answer, retries=settings.judge_retries
    )
    return {
        "score": judgement.rating,
        "status": "scored" if judgement.rating is not None else "unparsed",
        "scorer": "judge",
        "judge_replies": list(judgement.texts),
    }


def _generate(generator, cases: Sequence[NeedleCase], max_new_tokens: int) -> Iterator:
    from megatron_longalign.eval.generation import GenerationRequest

    requests = [GenerationRequest(c.key, c.prompt, max_new_tokens) for c in cases]
    yield from generator.generate(requests, desc="needle: generate")


def run_needle(settings: NeedleSettings, generator, judge=None) -> dict[str, Any]:
    """Run (or resume) the grid with `generator` (the eval.generation.Generator protocol);
    `judge` is a ChatClient, or None for recall scoring. Returns the summary."""
    scorer = "recall" if judge is None else "judge"
    tokenizer = load_tokenizer(generator.tokenizer_path)
    check_fits(settings, tokenizer)
    done = _check_resume(settings, settings.identity(tokenizer, scorer))
    grid = [(length, depth) for length in settings.lengths for depth in settings.depths]
    todo = [cell for cell in grid if case_key(*cell) not in done]
    if todo:
        index = build_haystack(settings, tokenizer)
        cases = [make_case(settings, tokenizer, index, *cell) for cell in todo]
        by_key = {case.key: case for case in cases}
        with RecordAppender(settings.output / "results.jsonl") as results:
            for generation in _scored(
                settings, judge, _generate(generator, cases, settings.max_new_tokens)
            ):
                record = _record(by_key[generation[0].key], *generation)
                results.append(record)
                done[record["key"]] = record
    summary = write_report(
        settings.output, done, settings.lengths, settings.depths,
        model=settings.model_name, scorer=scorer,
    )  # fmt: skip
    _report_problems(summary)
    log_to_wandb(
        settings.output / "heatmap.png", summary, settings.wandb_project,
        f"needle-{settings.model_name}", settings.output,
    )  # fmt: skip
    return summary


def _scored(settings: NeedleSettings, judge, generations: Iterator) -> Iterator[tuple[Any, dict]]:
    """(generation, score fields) as each case finishes; judge calls run concurrently."""
    if judge is None:
        for generation in generations:
            yield generation, _score(settings, None, generation.text)
        return
    scoring = judge.map(
        lambda g: _score(settings, judge, g.text), generations, desc="needle: judge"
    )
    yield from scoring


def _record(case: NeedleCase, generation, score: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": case.key,
        "length": case.length,
        "depth": case.depth,
        **case.facts,
        "prompt_tokens": generation.prompt_tokens,
        "truncated_tokens": generation.truncated_tokens,
        "answer": generation.text,
        **score,
    }


def _report_problems(summary: dict[str, Any]) -> None:
    if summary["truncated_cases"]:
        print(
            f"needle: warning: the backend truncated {summary['truncated_cases']} prompts "
            "(see truncated_tokens in results.jsonl); raise --max-length",
            file=sys.stderr,
        )
    if summary["unscored_keys"]:
        print(
            f"needle: warning: {len(summary['unscored_keys'])} cases have no score "
            f"(judge reply without a rating): {summary['unscored_keys']}",
            file=sys.stderr,
        )


# ---- command line ------------------------------------------------------------------------


def add_cli(subparsers) -> None:
    """The `needle` subcommand of tools/evaluate.py."""
    parser = subparsers.add_parser(
        "needle",
        help="needle-in-a-haystack heatmap",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grid = parser.add_argument_group("grid")
    grid.add_argument("--lengths", help='context lengths in tokens, e.g. "1k,2k,4k,8k" (k = 1000)')
    # --min/--max-context, not --max-length: that is the backend's prompt limit
    # (eval/generation's shared options), which the grid is checked against.
    grid.add_argument("--min-context", help="smallest context (default 1k)")
    grid.add_argument("--max-context", help="largest context (default 64k)")
    grid.add_argument("--num-lengths", type=int, help="evenly spaced lengths (default 10)")
    grid.add_argument("--depths", help='needle depths in percent, e.g. "0,25,50,75,100"')
    grid.add_argument("--min-depth", type=float, help="default 10")
    grid.add_argument("--max-depth", type=float, help="default 90")
    grid.add_argument("--num-depths", type=int, help="evenly spaced depths (default 10)")
    source = parser.add_argument_group("haystack and needle")
    source.add_argument(
        "--haystack-dir", help="directory of *.txt files (sorted, repeated if short)"
    )
    source.add_argument("--haystack", choices=("dir", "generated"), default=None,
                        help="generated: a built-in deterministic haystack (demo)")  # fmt: skip
    source.add_argument("--seed", type=int, default=0, help="seed of the generated haystack")
    source.add_argument("--needle", default=NEEDLE)
    source.add_argument("--question", default=QUESTION)
    source.add_argument(
        "--key-phrases", help='comma-separated (default "sandwich,Dolores Park,sunny day")'
    )
    source.add_argument("--max-new-tokens", type=int, default=128)
    scoring = parser.add_argument_group("scoring and output")
    scoring.add_argument("--output", required=True, help="output directory")
    scoring.add_argument(
        "--judge-retries", type=int, default=2, help="re-asks of a judge reply without a rating"
    )
    scoring.add_argument("--wandb-project", help="log the heatmap to wandb (mode: WANDB_MODE)")
    add_judge_arguments(parser)  # optional: key-phrase recall without a judge
    parser.set_defaults(func=run_cli)


def settings_from_args(args: argparse.Namespace) -> NeedleSettings:
    """NeedleSettings from the parsed options (raises GridError / NeedleError /
    HaystackError naming the option)."""
    haystack_dir = getattr(args, "haystack_dir", None)
    if args.haystack == "generated" and haystack_dir:
        raise NeedleError("give either --haystack-dir or --haystack generated, not both")
    if args.haystack != "generated" and not haystack_dir:
        raise NeedleError("give --haystack-dir DIR (text files) or --haystack generated (demo)")
    phrases = KEY_PHRASES
    if args.key_phrases is not None:
        phrases = tuple(p.strip() for p in args.key_phrases.split(",") if p.strip())
        if not phrases:
            raise NeedleError("--key-phrases: no phrases given")
    elif args.needle != NEEDLE:
        raise NeedleError("--needle changed: give its --key-phrases too (recall is scored on them)")
    if args.max_new_tokens < 1 or args.judge_retries < 0:
        raise NeedleError("--max-new-tokens must be >= 1 and --judge-retries >= 0")
    model = getattr(args, "served_model", None) or getattr(args, "model", None) or "model"
    settings = NeedleSettings(
        output=Path(args.output),
        lengths=length_grid(args.lengths, args.min_context, args.max_context, args.num_lengths),
        depths=depth_grid(args.depths, args.min_depth, args.max_depth, args.num_depths),
        haystack_dir=Path(haystack_dir) if haystack_dir else None,
        seed=args.seed,
        needle=args.needle,
        question=args.question,
        key_phrases=phrases,
        max_new_tokens=args.max_new_tokens,
        max_length=getattr(args, "max_length", None),
        # the last two path parts: "outputs/demo/hf" -> "demo/hf" (an exported dir is
        # often just "hf")
        model_name="/".join(Path(str(model)).parts[-2:]) or str(model),
        judge_retries=args.judge_retries,
        wandb_project=args.wandb_project,
    )
    settings.validate()
    return settings


def run_cli(args: argparse.Namespace, generator=None) -> int:
    """0: done; 2: bad input (message on stderr). `generator` is for tests; by default
    one is built from the shared generation options (eval/generation.py)."""
    try:
        settings = settings_from_args(args)
        judge = judge_client_from_args(args, settings.output / "judge_cache.jsonl")
    except (GridError, NeedleError, hs.HaystackError, JudgeOptionsError) as err:
        print(f"needle: error: {err}", file=sys.stderr)
        return 2
    own_generator = generator is None
    if own_generator:
        from megatron_longalign.eval.generation import build_generator, generation_options_from_args

        generator = build_generator(generation_options_from_args(args))
    try:
        summary = run_needle(settings, generator, judge)
    except (NeedleError, hs.HaystackError) as err:
        print(f"needle: error: {err}", file=sys.stderr)
        return 2
    finally:
        if own_generator:
            generator.close()
        if judge is not None:
            judge.close()
    print(json.dumps({k: summary[k] for k in ("mean_score", "cases", "status_counts")}))
    return 0
