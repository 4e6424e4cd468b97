"""LongBench-Chat (LongAlign, Bai et al. 2024): 50 real user queries over 10k-100k-token
documents, answered by the model and rated 1-10 by an LLM judge against a reference
answer (`tools/evaluate.py longbench-chat`, docs/EVALUATION.md).

Protocol (the paper's, not the public script's):
- generation: the query's `prompt` (document + question) is the user message, greedy,
  at most 1024 new tokens; a prompt longer than --max-length is middle-truncated by the
  Generator (first and last halves kept);
- judging: system prompt "You're a good assistant at evaluating the quality of texts.",
  temperature 0; the user message holds the instructions, the question, the reference
  answer, the query's scored example answers (few-shot) and the answer to rate, but not
  the document. The rating is the number in the reply's last `[[...]]` (eval.judge);
- the paper judges every answer twice, with the few-shot examples in two different
  shuffled orders, and averages (the public eval.py judges once, in file order). Here the
  two orders are two distinct permutations drawn from a generator seeded by the query
  idx (the same on every run); an answer's score is the mean of its parsed ratings, and
  the benchmark score the mean over answers with at least one parsed rating. Unparsed
  ratings are counted and reported, never scored 0.

Output directory: `answers.jsonl` (the model's answers; kept apart from the judgments
so a judge outage never forces regeneration), `results.jsonl` (one judged query per
line), `judge_cache.jsonl` (every judge reply: a rerun pays nothing twice),
`summary.json` and `summary.md`. A rerun skips answered and judged queries.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from math import factorial
from pathlib import Path
from typing import Any

from megatron_longalign.eval.generation import (
    GenerationRequest,
    Generator,
    build_generator,
    generation_options_from_args,
)
from megatron_longalign.eval.judge import (
    JudgeOptionsError,
    add_judge_arguments,
    judge_client_from_args,
    rate,
)
from megatron_longalign.eval.longbench_chat_data import ChatCase, load_cases
from megatron_longalign.utils.atomic_files import replace_text_atomically
from megatron_longalign.utils.chat_api import ChatAPIError, ChatClient, ChatUsage
from megatron_longalign.utils.jsonl_records import RecordAppender, RecordsFileError, read_records

MAX_NEW_TOKENS = 1024
JUDGE_ORDERS = 2
SYSTEM_PROMPT = "You're a good assistant at evaluating the quality of texts."
INSTRUCTIONS = """[Instructions]
You are asked to evaluate the quality of the AI assistant's answers to user questions as an impartial judge, and your evaluation should take into account factors including correctness (high priority), helpfulness, accuracy, and relevance. The scoring principles are as follows:
1. Read the AI assistant's answer and compare the assistant's answer with the reference answer.
2. Identify all errors in the AI Assistant's answers and consider how much they affect the answer to the question.
3. Evaluate how helpful the AI assistant's answers are in directly answering the user's questions and providing the information the user needs.
4. Examine any additional information in the AI assistant's answer to ensure that it is correct and closely related to the question. If this information is incorrect or not relevant to the question, points should be deducted from the overall score.

Please give an overall integer rating from 1 to 10 based on the above principles, strictly in the following format:"[[rating]]", e.g. "[[5]]"."""

ANSWERS_FILE, RESULTS_FILE, CACHE_FILE = "answers.jsonl", "results.jsonl", "judge_cache.jsonl"


class ResumeError(ValueError):
    """The output directory holds records of another run (other data or judge)."""


# ---- the judge's prompt --------------------------------------------------------------


def _answer_block(answer: str) -> str:
    return f"[Assistant's answer begins]\n{answer}\n[Assistant's answer ends]\n\nRating: "


def judge_prompt(case: ChatCase, answer: str, order: Sequence[int]) -> str:
    """The judge's user message for `answer`, with the examples in `order`."""
    examples = "".join(
        _answer_block(case.few_shots[i].answer) + f"[[{case.few_shots[i].score:g}]]\n\n"
        for i in order
    )
    return (
        f"{INSTRUCTIONS}\n\n[Question]\n{case.query}\n\n"
        f"[Reference answer begins]\n{case.answer}\n[Reference answer ends]\n\n"
        f"Below are several assistants' answers and their ratings:\n\n{examples}"
        "Please rate the following assistant answers based on the scoring principles "
        f"and examples above:\n\n{_answer_block(answer)}"
    )


def judge_messages(case: ChatCase, answer: str, order: Sequence[int]) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": judge_prompt(case, answer, order)},
    ]


def few_shot_orders(key: str, count: int, orders: int = JUDGE_ORDERS) -> list[tuple[int, ...]]:
    """`orders` distinct permutations of range(count), the same for the same query on
    every run and machine (random.Random seeded by a string is stable)."""
    if orders > factorial(count):
        raise ValueError(f"{count} examples have fewer than {orders} orders")
    rng = random.Random(f"longbench-chat:{key}")
    found: list[tuple[int, ...]] = []
    while len(found) < orders:
        permutation = list(range(count))
        rng.shuffle(permutation)
        if tuple(permutation) not in found:
            found.append(tuple(permutation))
    return found


# ---- generation (answers.jsonl) ------------------------------------------------------


def _check_known(records: list[dict], cases: list[ChatCase], path: Path) -> None:
    known = {case.idx for case in cases}
    for number, record in enumerate(records, 1):
        if record.get("idx") not in known:
            raise ResumeError(
                f"{path} record {number}: query idx {record.get('idx')!r} is not in the "
                "data file; this output directory belongs to another run (use a new --output)"
            )


def generate_answers(
    cases: list[ChatCase],
    make_generator: Callable[[], Generator],
    path: Path,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[int, dict[str, Any]]:
    """idx -> answer record for every case: those in `path` from an earlier run, the rest
    generated now (the generator is built only if some are missing) and appended as each
    finishes."""
    records = read_records(path)
    _check_known(records, cases, path)
    answers = {record["idx"]: record for record in records}
    pending = [case for case in cases if case.idx not in answers]
    if pending:
        by_key = {case.key: case for case in pending}
        requests = [GenerationRequest(c.key, c.prompt, max_new_tokens) for c in pending]
        generator = make_generator()
        try:
            with RecordAppender(path) as out:
                for generation in generator.generate(requests, desc="LongBench-Chat: answers"):
                    case = by_key.pop(generation.key, None)
                    if case is None:
                        raise RuntimeError(
                            f"the generator answered key {generation.key!r}, which was not "
                            "asked or was answered already"
                        )
                    record = {
                        "idx": case.idx,
                        "answer": generation.text.strip(),
                        "prompt_tokens": generation.prompt_tokens,
                        "completion_tokens": generation.completion_tokens,
                        "truncated_tokens": generation.truncated_tokens,
                    }
                    out.append(record)
                    answers[case.idx] = record
        finally:
            generator.close()
        if by_key:
            raise RuntimeError(f"the generator returned no answer for queries {sorted(by_key)}")
    return answers


# ---- judging (results.jsonl) ---------------------------------------------------------


def judge_case(client: ChatClient, case: ChatCase, answer: str) -> dict[str, Any]:
    """One query's record: a rating per few-shot order, and their mean (None when no
    rating parsed)."""
    orders = []
    for order in few_shot_orders(case.key, len(case.few_shots)):
        judged = rate(client, judge_messages(case, answer, order))
        orders.append(
            {
                "order": list(order),
                "rating": judged.rating,
                "parsed": judged.rating is not None,
                "attempts": judged.attempts,
                "judge_texts": list(judged.texts),
                "problems": list(judged.problems),
                "prompt_tokens": judged.prompt_tokens,
                "completion_tokens": judged.completion_tokens,
            }
        )
    ratings = [o["rating"] for o in orders if o["rating"] is not None]
    return {
        "idx": case.idx,
        "answer": answer,
        "judge_model": client.model,
        "orders": orders,
        "ratings": [o["rating"] for o in orders],
        "unparsed": len(orders) - len(ratings),
        "score": sum(ratings) / len(ratings) if ratings else None,
    }


def _check_judge(records: list[dict], model: str, path: Path) -> None:
    for number, record in enumerate(records, 1):
        if record.get("judge_model") != model:
            raise ResumeError(
                f"{path} record {number}: judged by {record.get('judge_model')!r}, not "
                f"{model!r}; judgments of two judges do not mix (use a new --output)"
            )


def judge_answers(
    cases: list[ChatCase], answers: dict[int, dict[str, Any]], client: ChatClient, path: Path
) -> None:
    """Judge every case not yet in `path`, appending each query's record as it finishes.
    A ChatAPIError is raised after the queries in flight are recorded."""
    done = {record["idx"] for record in read_records(path)}
    pending = [case for case in cases if case.idx not in done]
    if not pending:
        return

    def one(case: ChatCase) -> dict[str, Any]:
        return judge_case(client, case, answers[case.idx]["answer"])

    with RecordAppender(path) as out:
        for _, record in client.map(one, pending, desc="LongBench-Chat: judging"):
            out.append(record)


# ---- summary -------------------------------------------------------------------------


def summarize(cases: list[ChatCase], results: list[dict], usage: ChatUsage) -> dict[str, Any]:
    """The benchmark's numbers from the judged records (first record per query)."""
    by_idx: dict[int, dict] = {}
    for record in results:
        by_idx.setdefault(record["idx"], record)
    scored = [r for r in by_idx.values() if r["score"] is not None]
    mean = sum(r["score"] for r in scored) / len(scored) if scored else None
    orders = [order for r in by_idx.values() for order in r["orders"]]
    return {
        "score": mean,
        "score_x10": None if mean is None else mean * 10,
        "scale": "score: mean judge rating on 1-10 over scored queries; score_x10 = score * 10",
        "queries": len(cases),
        "queries_judged": len(by_idx),
        "queries_scored": len(scored),
        "queries_unscored": sorted(idx for idx, r in by_idx.items() if r["score"] is None),
        "queries_missing": sorted(c.idx for c in cases if c.idx not in by_idx),
        "ratings": len(orders),
        "ratings_unparsed": sum(1 for o in orders if not o["parsed"]),
        "judge_attempts": sum(o["attempts"] for o in orders),
        "judge_tokens": {
            "prompt_tokens": sum(o["prompt_tokens"] for o in orders),
            "completion_tokens": sum(o["completion_tokens"] for o in orders),
        },
        "judge_usage_this_run": usage.as_dict(),
        "complete": len(by_idx) == len(cases),
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    rows = [
        ("score (1-10)", number(summary["score"])),
        ("score x10 (0-100)", number(summary["score_x10"])),
        (
            "queries scored / judged / total",
            f"{summary['queries_scored']} / {summary['queries_judged']} / {summary['queries']}",
        ),
        ("queries without a parsed rating", str(len(summary["queries_unscored"]))),
        ("ratings unparsed / asked", f"{summary['ratings_unparsed']} / {summary['ratings']}"),
        (
            "judge tokens (prompt + completion)",
            f"{summary['judge_tokens']['prompt_tokens']} + "
            f"{summary['judge_tokens']['completion_tokens']}",
        ),
        ("complete", "yes" if summary["complete"] else "no (rerun to resume)"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"# LongBench-Chat\n\n| | |\n|---|---|\n{table}\n"


# ---- the run -------------------------------------------------------------------------


def judge_cache_path(output: str | os.PathLike) -> Path:
    return Path(output) / CACHE_FILE


def run_longbench_chat(
    cases: list[ChatCase],
    make_generator: Callable[[], Generator],
    client: ChatClient,
    output: str | os.PathLike,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Answer, judge and summarize `cases` into `output`, resuming an earlier run. The
    summary is written even when the judge fails (marked incomplete); the ChatAPIError
    then propagates."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    results_path = output / RESULTS_FILE
    earlier = read_records(results_path)  # checked before any expensive work
    _check_known(earlier, cases, results_path)
    _check_judge(earlier, client.model, results_path)
    answers = generate_answers(cases, make_generator, output / ANSWERS_FILE, max_new_tokens)
    try:
        judge_answers(cases, answers, client, results_path)
    finally:
        summary = summarize(cases, read_records(results_path), client.usage)
        replace_text_atomically(output / "summary.json", json.dumps(summary, indent=2) + "\n")
        replace_text_atomically(output / "summary.md", summary_markdown(summary))
    return summary


# ---- command line --------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "longbench-chat",
        help="LongBench-Chat: answers rated 1-10 by an LLM judge",
        description="LongBench-Chat with the paper's protocol: two judge calls per answer "
        "with the few-shot examples in two shuffled orders, averaged (docs/EVALUATION.md).",
    )
    parser.add_argument(
        "--data", required=True, help="the queries: LongBench-Chat test_cases.json (or .jsonl)"
    )
    parser.add_argument(
        "--few-shots",
        default=None,
        help="the scored example answers: few_shots.json (item idx-1 per query); "
        "omit when every query carries a 'few_shots' field",
    )
    parser.add_argument("--output", required=True, help="output directory (resumable)")
    parser.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=MAX_NEW_TOKENS,
        help="answer length limit (default: %(default)s, as LongAlign)",
    )
    add_judge_arguments(parser)
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    output, client = Path(args.output), None
    try:  # every input is checked before the model is loaded
        cases = load_cases(args.data, args.few_shots)
        client = judge_client_from_args(args, judge_cache_path(output))
        if client is None:
            raise JudgeOptionsError(
                "longbench-chat needs a judge: give --judge-base-url and --judge-model"
            )
        options = generation_options_from_args(args)
    except ValueError as err:  # ChatDataError, JudgeOptionsError, RecordsFileError, options
        if client is not None:
            client.close()
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run_longbench_chat(
            cases,
            lambda: build_generator(options),
            client,
            output,
            max_new_tokens=args.max_new_tokens,
        )
    except (ResumeError, RecordsFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ChatAPIError as err:
        print(
            f"error: the judge failed: {err}\nanswers are kept in {output / ANSWERS_FILE} and "
            f"finished judgments in {output / RESULTS_FILE}; rerun the same command to resume",
            file=sys.stderr,
        )
        return 1
    finally:
        client.close()
    print(
        f"LongBench-Chat: {_score_text(summary)} over {summary['queries_scored']} of "
        f"{summary['queries']} queries; {summary['ratings_unparsed']} unparsed ratings "
        f"(details in {output / 'summary.md'})"
    )
    return 0


def _score_text(summary: dict[str, Any]) -> str:
    if summary["score"] is None:
        return "no score"
    return f"score {summary['score']:.2f}/10 ({summary['score_x10']:.1f}/100)"
