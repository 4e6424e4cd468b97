"""The four Self-Instruct task prompts of LongAlign (paper appendix A), in English and
Chinese, and how a prompt is put together with its document.

The English "general" prompt is the paper's wording; the other three follow the same
format and differ only in what kind of question they ask for (summarization or
integration across parts, multi-hop reasoning, information seeking). The Chinese
prompts are translations, asking for Chinese questions in the same numbered format
with a full-width colon, which the parser accepts as well as ":".

Changing any prompt text changes the data: bump PROMPTS_VERSION, which the settings
sidecar records so a resumed run never mixes prompt versions.
"""

from __future__ import annotations

from megatron_longalign.datagen.language import CHINESE, ENGLISH

PROMPTS_VERSION = "longalign-appendix-a/1"
NUM_QUESTIONS = 5
GENERAL, SUMMARY, REASONING, EXTRACTION = "general", "summary", "reasoning", "extraction"
TASK_TYPES = (GENERAL, SUMMARY, REASONING, EXTRACTION)

_EN_FORMAT = 'in the following format: "1: ", "2: ", ...'
_ZH_FORMAT = "格式如下：“1：”，“2：”，……"

QUESTION_PROMPTS: dict[str, dict[str, str]] = {
    ENGLISH: {
        GENERAL: "Given the above text, please propose 5 English questions that are diverse "
        f"and cover all parts of the text, {_EN_FORMAT}",
        SUMMARY: "Given the above text, please propose 5 English questions that require "
        "summarization or integration from multiple parts, make sure they are diverse and "
        f"cover all parts of the text, {_EN_FORMAT}",
        REASONING: "Given the above text, please propose 5 English questions that require "
        "multi-hop reasoning, make sure they are diverse and cover all parts of the text, "
        f"{_EN_FORMAT}",
        EXTRACTION: "Given the above text, please propose 5 English information-seeking "
        f"questions, make sure they are diverse and cover all parts of the text, {_EN_FORMAT}",
    },
    CHINESE: {
        GENERAL: f"根据以上文本，请提出5个多样化且覆盖文本各个部分的中文问题，{_ZH_FORMAT}",
        SUMMARY: "根据以上文本，请提出5个需要对文本多个部分进行总结或整合才能回答的中文问题，"
        f"确保问题多样化且覆盖文本各个部分，{_ZH_FORMAT}",
        REASONING: "根据以上文本，请提出5个需要多跳推理才能回答的中文问题，"
        f"确保问题多样化且覆盖文本各个部分，{_ZH_FORMAT}",
        EXTRACTION: "根据以上文本，请提出5个信息检索类的中文问题，"
        f"确保问题多样化且覆盖文本各个部分，{_ZH_FORMAT}",
    },
}

# Between the document and what follows it. The training templates split a user turn
# into context and question at its last blank line (data/templates.py), so the question
# itself never contains one (parsing joins a question's lines with spaces).
SEPARATOR = "\n\n"


def question_request(document: str, task_type: str, language: str) -> str:
    """The user message asking for NUM_QUESTIONS questions about `document`."""
    return document + SEPARATOR + QUESTION_PROMPTS[language][task_type]


def sample_prompt(document: str, question: str) -> str:
    """The user turn of the sample (and of the answer request): document, then question."""
    return document + SEPARATOR + question
