"""Deterministic synthetic instruction data for the demo, the tests and the benchmarks.

Mimics the LongAlign data mix at toy scale: *long* samples whose answer depends on a fact
buried somewhere in a long context (passkey retrieval, two-hop reasoning, key-value lookup)
plus *short* everyday chats. Every record uses the OpenAI/LongAlign schema::

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

Long user turns always put the context first and the question last, separated by the
final ``"\\n\\n"`` of the content, because preprocessing splits there.

Only the standard library is used and all randomness flows through ``random.Random``
instances, so the same seed always yields byte-identical data (the bundled sample files
are regenerated from a seed rather than edited by hand).
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO

from megatron_longalign.data.conversation import conversation_from_record

__all__ = [
    "STYLES",
    "generate_long_samples",
    "generate_short_chats",
    "tokenizer_training_text",
    "validate_record",
    "vocabulary",
    "write_jsonl",
]

Message = dict[str, str]
QA = tuple[str, str]

STYLES = ("messages", "sharegpt")
_SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}

# --------------------------------------------------------------------------------------
# Word material. The pseudo-word vocabulary is derived from syllables with a fixed seed
# (not from the caller's seed) so every dataset and the tokenizer share one vocabulary.
# Changing any constant below changes every generated sample.
# --------------------------------------------------------------------------------------

_VOCAB_SIZE = 600
_VOCAB_SEED = 0x5EED_A1
_ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "br", "dr", "gr", "kr", "tr", "st", "th", "sh", "ch", "pl",
)  # fmt: skip
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "th")

# English glue words make the filler read like (nonsense) prose and give the tokenizer
# the same function words that the fact and question templates use.
_GLUE = (
    "the", "a", "of", "and", "to", "in", "with", "for", "on", "by", "from", "near",
    "under", "over", "was", "is", "that", "as", "at", "its", "their", "into", "beyond",
    "after",
)  # fmt: skip
_GLUE_WEIGHT = 8  # ~22% of filler words are glue words

_NAMES = (
    "Tomas", "Alina", "Bruno", "Celia", "Dario", "Elena", "Farid", "Greta", "Hugo", "Ines",
    "Jonas", "Kira", "Leon", "Mira", "Nadia", "Oskar", "Petra", "Quinn", "Rafael", "Sanna",
    "Tariq", "Ursula", "Viktor", "Wanda", "Xavier", "Yara", "Zeno", "Amara", "Bastian",
    "Clara", "Dmitri", "Esther", "Felix", "Helga", "Ivo", "Lucia",
)  # fmt: skip
_CITIES = (
    "Verdane", "Ostrava", "Myrelle", "Kasmir", "Belhaven", "Torvik", "Lunaris", "Caldera",
    "Ashgrove", "Penmoor", "Rivenport", "Solbrek", "Dunmere", "Quarlen", "Estoria",
    "Halvard", "Norwick", "Virelle", "Zanthe", "Orlune", "Brisca", "Fennmark", "Galdor",
    "Sarnoth", "Tessaly", "Windhelm", "Corvale", "Maravel", "Ithren", "Pellucid",
)  # fmt: skip
_OBJECTS = (
    "gate", "lantern", "tower", "bridge", "chest", "door", "vault", "garden", "ship",
    "clock", "mirror", "harp", "well", "statue", "bell", "archive", "library",
    "lighthouse", "mill", "fountain", "carriage", "observatory", "forge", "greenhouse",
    "cellar", "balcony", "orchard", "harbor", "tunnel", "workshop",
)  # fmt: skip
_COLORS = (
    "amber", "crimson", "silver", "golden", "violet", "emerald", "azure", "scarlet",
    "ivory", "cobalt", "copper", "jade", "ochre", "indigo", "russet", "teal", "saffron",
    "ashen", "coral", "obsidian",
)  # fmt: skip
# Two-hop answers: "<verb> <material> <goods>", e.g. "weaving copper lanterns".
_CRAFT_VERBS = (
    "weaving", "carving", "forging", "painting", "brewing", "glazing", "stitching",
    "polishing", "engraving", "casting", "dyeing", "binding",
)  # fmt: skip
_CRAFT_MATERIALS = (
    "copper", "glass", "oak", "silk", "clay", "bronze", "wool", "marble", "leather",
    "pewter", "cedar", "linen",
)  # fmt: skip
_CRAFT_GOODS = (
    "lanterns", "bowls", "bells", "masks", "kites", "baskets", "rugs", "flutes", "clocks",
    "boats", "lamps", "chairs",
)  # fmt: skip
_ATTRIBUTES = (
    "secret code", "passkey", "access number", "serial number", "vault combination",
    "registry number",
)  # fmt: skip

# Non-ASCII snippets (accents, CJK, Cyrillic, Greek, emoji) so encoding paths are exercised.
_UNICODE_WORDS = (
    "café", "naïve", "東京", "Zürich", "São Paulo", "crème brûlée", "Ελλάδα", "Москва",
    "한국어", "ñandú", "🙂", "🚀", "🌸", "façade", "Ångström", "smörgåsbord", "piñata",
    "jalapeño", "München", "Kraków",
)  # fmt: skip

_LONG_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a meticulous assistant. Read the whole document before answering.",
    "Answer questions about long documents accurately and concisely.",
    "You are an assistant that quotes the exact fact from the context when answering.",
)
_SHORT_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly assistant who answers briefly.",
    "Answer in one complete sentence.",
    "You are a precise assistant. Follow the instructions exactly.",
)
# Prepended to tiny chats (e.g. one arithmetic question) to reach the minimum length.
_LEAD_INS = (
    "I have a small task for you today.",
    "Please help me with the following request.",
    "Here is something I would like you to do for me.",
    "Could you help me with a quick exercise, please?",
)

_SENTENCE_WORDS = (6, 18)
_PARAGRAPH_SENTENCES = (3, 8)
_SHORT_CHAT_WORDS = (20, 400)
_LONG_SYSTEM_RATE = 0.3
_LONG_MULTI_TURN_RATE = 0.2
_SHORT_SYSTEM_RATE = 0.2
_SHORT_UNICODE_RATE = 0.05
_KV_RECORD_WORDS = 5  # "Record 01234: key = VALUE." splits into five words
_BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """The fixed pseudo-word vocabulary (~600 lowercase ASCII words), same on every call."""
    rng = random.Random(_VOCAB_SEED)
    # Keep pseudo-words disjoint from the real words so a question's subject or answer
    # can never be confused with random filler.
    reserved = {
        w.lower()
        for w in itertools.chain(
            _GLUE, _NAMES, _CITIES, _OBJECTS, _COLORS, _CRAFT_VERBS, _CRAFT_MATERIALS
        )
    }
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < _VOCAB_SIZE:
        syllables = rng.choice((2, 2, 3))
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) for _ in range(syllables))
        word = stem + rng.choice(_CODAS)
        if word not in seen and word not in reserved:
            seen.add(word)
            words.append(word)
    return tuple(words)


@functools.lru_cache(maxsize=1)
def _filler_pool() -> tuple[str, ...]:
    # Repetition encodes the word weights so sampling is a single fast rng.choices call.
    return vocabulary() + _GLUE * _GLUE_WEIGHT + _NAMES + _CITIES + _OBJECTS + _COLORS


def _sample_rng(seed: int, stream: str, index: int) -> random.Random:
    # One independent generator per sample: sample i does not depend on how many samples
    # are requested, and string seeds hash identically on every platform and run.
    return random.Random(f"megatron_longalign.synthetic/{stream}/{seed}/{index}")


def _word_count(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------------------
# Filler text
# --------------------------------------------------------------------------------------


def _sentence(rng: random.Random, n_words: int) -> str:
    words = rng.choices(_filler_pool(), k=n_words)
    words[0] = words[0][0].upper() + words[0][1:]
    if n_words >= 10 and rng.random() < 0.3:
        words[rng.randrange(3, n_words - 3)] += ","
    return " ".join(words) + "."


def _filler_sentences(rng: random.Random, budget: int) -> list[str]:
    """Sentences totalling exactly `budget` words (none if budget < the minimum length)."""
    low, high = _SENTENCE_WORDS
    sentences = []
    remaining = budget
    while remaining >= low:
        n_words = rng.randint(low, high)
        if remaining - n_words < low:
            # Never leave a tail too short for a sentence: the word total stays exact.
            n_words = remaining if remaining <= high else remaining - low
        sentences.append(_sentence(rng, n_words))
        remaining -= n_words
    return sentences


def _paragraph_sizes(rng: random.Random, total: int) -> list[int]:
    low, high = _PARAGRAPH_SENTENCES
    sizes = []
    remaining = total
    while remaining > high:
        # Leave at least `low` sentences so the last paragraph is not a stub.
        size = rng.randint(low, min(high, remaining - low))
        sizes.append(size)
        remaining -= size
    if remaining:
        sizes.append(remaining)
    return sizes


def _paragraphs(rng: random.Random, sentences: list[str]) -> str:
    chunks = []
    start = 0
    for size in _paragraph_sizes(rng, len(sentences)):
        chunks.append(" ".join(sentences[start : start + size]))
        start += size
    return "\n\n".join(chunks)


def _document(rng: random.Random, budget: int, facts: list[tuple[str, float]]) -> str:
    """Filler paragraphs of `budget` words in total with each (sentence, depth) fact
    inserted at its relative depth (0.0 = first sentence, 1.0 = last)."""
    fact_words = sum(_word_count(sentence) for sentence, _ in facts)
    sentences = _filler_sentences(rng, max(0, budget - fact_words))
    slots = len(sentences)
    placed = sorted(((round(depth * slots), sentence) for sentence, depth in facts), reverse=True)
    # Insert from the back so earlier insertion points stay valid.
    for position, sentence in placed:
        sentences.insert(position, sentence)
    return _paragraphs(rng, sentences)


# --------------------------------------------------------------------------------------
# Facts and their questions
# --------------------------------------------------------------------------------------


def _retrieval_facts(rng: random.Random, count: int) -> list[tuple[str, QA]]:
    """(fact sentence, (question, answer)) with distinct subjects and distinct numbers."""
    pairs = rng.sample(range(len(_COLORS) * len(_OBJECTS)), count)
    numbers = rng.sample(range(10_000, 100_000), count)
    facts = []
    for pair, number in zip(pairs, numbers, strict=True):
        color, thing = _COLORS[pair // len(_OBJECTS)], _OBJECTS[pair % len(_OBJECTS)]
        attribute = rng.choice(_ATTRIBUTES)
        fact = f"The {attribute} of the {color} {thing} is {number}."
        question = f"What is the {attribute} of the {color} {thing}?"
        facts.append((fact, (question, fact)))
    return facts


def _craft(index: int) -> str:
    # Mixed-radix decoding: every index below the product names a distinct craft.
    materials, goods = len(_CRAFT_MATERIALS), len(_CRAFT_GOODS)
    return (
        f"{_CRAFT_VERBS[index // (materials * goods)]} "
        f"{_CRAFT_MATERIALS[index // goods % materials]} {_CRAFT_GOODS[index % goods]}"
    )


def _hop_chains(rng: random.Random, count: int) -> list[tuple[str, str, QA]]:
    """(person fact, city fact, (question, answer)); people, cities and crafts distinct so
    every question has exactly one supporting chain."""
    people = rng.sample(_NAMES, count)
    cities = rng.sample(_CITIES, count)
    n_crafts = len(_CRAFT_VERBS) * len(_CRAFT_MATERIALS) * len(_CRAFT_GOODS)
    crafts = [_craft(i) for i in rng.sample(range(n_crafts), count)]
    chains = []
    for person, city, craft in zip(people, cities, crafts, strict=True):
        person_fact = f"{person} lives in {city}."
        city_fact = f"The people of {city} are famous for {craft}."
        question = f"What is the city where {person} lives famous for?"
        answer = f"{person} lives in {city}, and the people of {city} are famous for {craft}."
        chains.append((person_fact, city_fact, (question, answer)))
    return chains


# --------------------------------------------------------------------------------------
# Long samples: each builder returns (context, [(question, answer), ...]); the first
# question goes after the context, later ones become follow-up turns.
# --------------------------------------------------------------------------------------


def _retrieval_task(rng: random.Random, budget: int, turns: int) -> tuple[str, list[QA]]:
    facts = _retrieval_facts(rng, max(turns, rng.randint(1, 3)))
    placed = [(sentence, rng.random()) for sentence, _ in facts]
    return _document(rng, budget, placed), [qa for _, qa in facts[:turns]]


def _multi_hop_task(rng: random.Random, budget: int, turns: int) -> tuple[str, list[QA]]:
    chains = _hop_chains(rng, max(turns, rng.randint(1, 3)))
    placed = []
    for index, (person_fact, city_fact, _) in enumerate(chains):
        if index == 0:
            # The asked-about hops sit in opposite parts of the context so that answering
            # needs information from far apart, in either order.
            near, far = rng.uniform(0.0, 0.4), rng.uniform(0.6, 1.0)
            first, second = (
                (person_fact, city_fact) if rng.random() < 0.5 else (city_fact, person_fact)
            )
            placed += [(first, near), (second, far)]
        else:
            placed += [(person_fact, rng.random()), (city_fact, rng.random())]
    return _document(rng, budget, placed), [qa for _, _, qa in chains[:turns]]


def _base36(number: int) -> str:
    digits = []
    while number:
        number, digit = divmod(number, 36)
        digits.append(_BASE36[digit])
    return "".join(reversed(digits)) or "0"


def _key_value_task(rng: random.Random, budget: int, turns: int) -> tuple[str, list[QA]]:
    low = _SENTENCE_WORDS[0]
    n_records = max(turns, (budget - low) // _KV_RECORD_WORDS)
    # A short preamble absorbs the remainder so the context has exactly `budget` words.
    preamble = _filler_sentences(rng, budget - n_records * _KV_RECORD_WORDS)
    vocab = vocabulary()
    width = max(5, len(str(n_records * 10)))
    ids = rng.sample(range(10**width), n_records)
    keys = rng.sample(range(len(vocab) ** 2), n_records)
    values = rng.sample(range(36**5, 36**6), n_records)  # always six base-36 characters
    lines = []
    pairs = []
    for record_id, key_index, value in zip(ids, keys, values, strict=True):
        key = f"{vocab[key_index // len(vocab)]}_{vocab[key_index % len(vocab)]}"
        pairs.append((key, _base36(value)))
        lines.append(f"Record {record_id:0{width}d}: {key} = {pairs[-1][1]}.")
    qas = []
    for index in rng.sample(range(n_records), turns):
        key, value = pairs[index]
        qas.append(
            (f"What is the value of the key {key}?", f"The value of the key {key} is {value}.")
        )
    blocks = [" ".join(preamble)] if preamble else []
    blocks.append("\n".join(lines))
    return "\n\n".join(blocks), qas


_LONG_TASKS: tuple[Callable[[random.Random, int, int], tuple[str, list[QA]]], ...] = (
    _retrieval_task,
    _multi_hop_task,
    _key_value_task,
)


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    value = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    return min(high, max(low, value))


def _conversation(system: str | None, first_user: str, qas: list[QA]) -> dict:
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for index, (question, answer) in enumerate(qas):
        messages.append({"role": "user", "content": first_user if index == 0 else question})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def _long_sample(rng: random.Random, target_words: int) -> dict:
    task = rng.choice(_LONG_TASKS)
    turns = 2 if rng.random() < _LONG_MULTI_TURN_RATE else 1
    system = rng.choice(_LONG_SYSTEM_PROMPTS) if rng.random() < _LONG_SYSTEM_RATE else None
    context, qas = task(rng, target_words, turns)
    return _conversation(system, f"{context}\n\n{qas[0][0]}", qas)


def _check_count(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def generate_long_samples(
    num_samples: int, min_words: int, max_words: int, seed: int
) -> Iterator[dict]:
    """Yield `num_samples` long-context records (retrieval, two-hop or key-value lookup).

    The context of the first user turn has a word count drawn log-uniformly from
    [min_words, max_words] (exact, unless the inserted facts alone exceed it); the
    question follows the context after a blank line.
    """
    _check_count("num_samples", num_samples)
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    # Validate eagerly, generate lazily: a generator body would defer the errors above.
    return _long_stream(num_samples, min_words, max_words, seed)


def _long_stream(num_samples: int, min_words: int, max_words: int, seed: int) -> Iterator[dict]:
    for index in range(num_samples):
        rng = _sample_rng(seed, "long", index)
        yield _long_sample(rng, _log_uniform(rng, min_words, max_words))


# --------------------------------------------------------------------------------------
# Short chats: each task returns one (question, answer) pair.
# --------------------------------------------------------------------------------------


def _arithmetic_task(rng: random.Random) -> QA:
    operation = rng.choice(("plus", "minus", "times"))
    if operation == "times":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        result = a * b
    else:
        a, b = rng.randint(1, 500), rng.randint(1, 500)
        if operation == "minus":
            a, b = max(a, b), min(a, b)  # keep answers non-negative
        result = a + b if operation == "plus" else a - b
    return f"What is {a} {operation} {b}?", f"{a} {operation} {b} is {result}."


def _list_task(rng: random.Random, words: list[str]) -> QA:
    listed = ", ".join(words)
    if rng.random() < 0.5:
        return f"Reverse the order of this list: {listed}.", f"Reversed: {', '.join(words[::-1])}."
    return f"Sort these words alphabetically: {listed}.", f"Sorted: {', '.join(sorted(words))}."


def _word_list_task(rng: random.Random) -> QA:
    return _list_task(rng, rng.sample(vocabulary(), rng.randint(3, 8)))


def _copy_task(rng: random.Random) -> QA:
    sentence = _sentence(rng, rng.randint(*_SENTENCE_WORDS))
    return f"Copy this sentence exactly: {sentence}", sentence


def _paragraph_task(rng: random.Random) -> QA:
    sentences = [_sentence(rng, rng.randint(*_SENTENCE_WORDS)) for _ in range(rng.randint(2, 5))]
    if rng.random() < 0.5:
        ((fact, qa),) = _retrieval_facts(rng, 1)
    else:
        ((fact, _, _),) = _hop_chains(rng, 1)
        person = fact.split(" lives in ")[0]
        qa = (f"Where does {person} live?", fact)
    sentences.insert(rng.randint(0, len(sentences)), fact)
    question, answer = qa
    return f"{' '.join(sentences)}\n\n{question}", answer


def _unicode_task(rng: random.Random) -> QA:
    exotic = rng.sample(_UNICODE_WORDS, rng.randint(2, 4))
    if rng.random() < 0.5:
        return _list_task(rng, exotic)
    words = rng.choices(_filler_pool(), k=rng.randint(4, 10)) + exotic
    rng.shuffle(words)
    sentence = words[0][0].upper() + " ".join(words)[1:] + "."
    return f"Copy this sentence exactly: {sentence}", sentence


_SHORT_TASKS: tuple[Callable[[random.Random], QA], ...] = (
    _arithmetic_task,
    _word_list_task,
    _copy_task,
    _paragraph_task,
)


def _chat_words(system: str | None, qas: list[QA]) -> int:
    return _word_count(system or "") + sum(_word_count(q) + _word_count(a) for q, a in qas)


def _short_chat(rng: random.Random) -> dict:
    qas = [rng.choice(_SHORT_TASKS)(rng) for _ in range(rng.choice((1, 1, 1, 2, 2, 3)))]
    if rng.random() < _SHORT_UNICODE_RATE:
        qas[rng.randrange(len(qas))] = _unicode_task(rng)
    system = rng.choice(_SHORT_SYSTEM_PROMPTS) if rng.random() < _SHORT_SYSTEM_RATE else None
    low, high = _SHORT_CHAT_WORDS
    while len(qas) > 1 and _chat_words(system, qas) > high:
        qas.pop()
    while _chat_words(system, qas) < low:
        question, answer = qas[0]
        qas[0] = (f"{rng.choice(_LEAD_INS)} {question}", answer)
    return _conversation(system, qas[0][0], qas)


def generate_short_chats(num_samples: int, seed: int) -> Iterator[dict]:
    """Yield `num_samples` short chats (1-3 turns, 20-400 words): arithmetic, list
    reversal/sorting, sentence copying and questions about a short paragraph."""
    _check_count("num_samples", num_samples)
    return (_short_chat(_sample_rng(seed, "short", index)) for index in range(num_samples))


# --------------------------------------------------------------------------------------
# Tokenizer corpus
# --------------------------------------------------------------------------------------


def _coverage_lines() -> list[str]:
    """Lines that together contain every word the generators can emit, so a tokenizer
    trained on few lines still sees the whole vocabulary at least once."""
    groups = [
        vocabulary(),
        _NAMES,
        _CITIES,
        _OBJECTS + _COLORS,
        _CRAFT_VERBS + _CRAFT_MATERIALS + _CRAFT_GOODS,
        _GLUE + _ATTRIBUTES,
        _UNICODE_WORDS,
    ]
    lines = []
    for group in groups:
        for start in range(0, len(group), 12):
            chunk = " ".join(group[start : start + 12])
            lines.append(chunk[0].upper() + chunk[1:] + ".")
    return lines


def _flatten(*texts: str) -> str:
    return " ".join(" ".join(text.split()) for text in texts)


def _training_line(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return _flatten(*(_sentence(rng, rng.randint(*_SENTENCE_WORDS)) for _ in range(3)))
    if kind == 1:
        ((fact, (question, answer)),) = _retrieval_facts(rng, 1)
        return _flatten(fact, question, answer)
    if kind == 2:
        ((person_fact, city_fact, (question, answer)),) = _hop_chains(rng, 1)
        return _flatten(person_fact, city_fact, question, answer)
    if kind == 3:
        context, ((question, answer),) = _key_value_task(rng, 26, 1)
        return _flatten(context, question, answer)
    if kind == 4:
        system = rng.choice(_LONG_SYSTEM_PROMPTS + _SHORT_SYSTEM_PROMPTS + _LEAD_INS)
        return _flatten(system, *rng.choice(_SHORT_TASKS)(rng))
    return _flatten(*_unicode_task(rng))


def tokenizer_training_text(num_lines: int, seed: int) -> Iterator[str]:
    """Yield `num_lines` newline-free lines covering the vocabulary, sentence shapes and
    question/answer phrasings of the generators (for training a tiny tokenizer)."""
    _check_count("num_lines", num_lines)
    coverage = _coverage_lines()
    head = coverage[:num_lines]
    rng = _sample_rng(seed, "tokenizer", 0)
    return itertools.chain(head, (_training_line(rng) for _ in range(num_lines - len(head))))


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def validate_record(record: dict) -> None:
    """Raise ValueError unless `record` is a well-formed ``{"messages": [...]}`` chat:
    optional system message, then user/assistant alternating, ending on assistant.

    The checks are preprocessing's own (`data.conversation`, which raises `BadSample`, a
    ValueError); on top of it the records written here use the "messages" schema with
    the canonical role names only (no ShareGPT keys, no aliases such as "human")."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        raise ValueError('record must have a "messages" list')
    conversation = conversation_from_record({"messages": messages})
    for index, (message, turn) in enumerate(zip(messages, conversation.turns, strict=True)):
        if message["role"] != turn.role:
            raise ValueError(f"messages[{index}] role must be {turn.role!r}: {message!r:.80}")


def _to_style(record: dict, style: str) -> dict:
    if style == "messages":
        return record
    return {
        "conversations": [
            {"from": _SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in record["messages"]
        ]
    }


def _write_lines(sink: IO[bytes], records: Iterable[dict], style: str) -> int:
    count = 0
    for record in records:
        validate_record(record)
        line = json.dumps(_to_style(record, style), ensure_ascii=False) + "\n"
        sink.write(line.encode("utf-8"))
        count += 1
    return count


def write_jsonl(records: Iterable[dict], path: str | os.PathLike, style: str = "messages") -> int:
    """Write records as JSON lines (gzip when `path` ends in .gz); return the count.

    `style="sharegpt"` converts to ``{"conversations": [{"from", "value"}]}``. The file is
    replaced atomically, and gzip output carries no timestamp or name so equal records
    always give equal bytes.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as raw:
            if path.endswith(".gz"):
                # No file name and a zero mtime in the header: the bytes depend on data only.
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as sink:
                    count = _write_lines(sink, records, style)
            else:
                count = _write_lines(raw, records, style)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; data files should be readable
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    return count
