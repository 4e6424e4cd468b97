"""A fake generator behind tests.helpers.openai_server.OpenAIStub: replies derived from
the request, so a test can tell which document and step each reply is for.

Documents in these tests start with a marker word `DOCn` (or `文档n`). The question
request ends with a task prompt ("please propose 5" / "请提出5个"); the fake answers
with 5 questions naming the marker. Any other request is an answer request: the user
content ends with the chosen question, and the fake answers with a sentence naming it.
`Behaviour` lets a test replace the reply for one document and step, per attempt.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from tests.helpers.openai_server import StubReply

QUESTION_MARKERS = ("please propose 5", "请提出5个")


def user_content(body: dict) -> str:
    return body["messages"][-1]["content"]


def is_question_request(body: dict) -> bool:
    tail = user_content(body)[-400:]
    return any(marker in tail for marker in QUESTION_MARKERS)


def marker_of(body: dict) -> str:
    return user_content(body).split(maxsplit=1)[0]


EN_TOPICS = (
    "Who guards the amber gate",
    "Where are the copper lanterns sold",
    "Why does the city weave lanterns",
    "When was the secret code set",
    "How does Tomas Verdane open the gate",
)
ZH_TOPICS = (
    "谁守护琥珀门",
    "铜灯笼卖到哪里",
    "这座城市为何编织灯笼",
    "密码是何时设定的",
    "托马斯如何打开城门",
)


def questions_for(marker: str, chinese: bool = False) -> list[str]:
    """The 5 (distinct) questions the fake proposes for a document."""
    if chinese:
        return [f"在{marker}中，{topic}？" for topic in ZH_TOPICS]
    return [f"In {marker}, {topic.lower()}?" for topic in EN_TOPICS]


def good_questions(marker: str, chinese: bool = False) -> str:
    if chinese:
        return "\n".join(f"{i}：{q}" for i, q in enumerate(questions_for(marker, True), 1))
    lines = [f"{i}: {q}" for i, q in enumerate(questions_for(marker), 1)]
    return "Here are the questions:\n" + "\n".join(lines)


def good_answer(body: dict) -> str:
    question = user_content(body).rsplit("\n\n", 1)[-1]
    return f"Answer for {marker_of(body)}: {question}"


# (marker, "questions" | "answer", attempt number from 1) -> reply, or None for the default
Override = Callable[[str, str, int], "str | StubReply | None"]


class FakeModel:
    """A callable for OpenAIStub. Thread-safe attempt counting per request content."""

    def __init__(self, override: Override | None = None) -> None:
        self.override = override
        self._attempts: Counter = Counter()
        self._lock = threading.Lock()

    def __call__(self, body: dict) -> str | StubReply:
        stage = "questions" if is_question_request(body) else "answer"
        marker = marker_of(body)
        with self._lock:
            self._attempts[user_content(body)] += 1
            attempt = self._attempts[user_content(body)]
        if self.override is not None:
            reply = self.override(marker, stage, attempt)
            if reply is not None:
                return reply
        if stage == "questions":
            return good_questions(marker, chinese="请提出" in user_content(body)[-200:])
        return good_answer(body)
