"""The 21 LongBench (v1) tasks: prompt template, generation budget, metric, language.

Prompts and maximum generation lengths are LongBench's own (config/dataset2prompt.json
and config/dataset2maxlen.json of THUDM/LongBench), verbatim, typos included
("asconcisely"): a changed prompt changes the scores, and the numbers should be
comparable with published LongBench results. Metric, language and category follow
LongBench's eval.py and task.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The few-shot and completion tasks LongBench's pred.py sends to the model WITHOUT a chat
# template, and the tasks whose prediction eval.py cuts at the first newline.
_RAW_PROMPT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
_FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
# LongBench-E: the 13 tasks re-sampled with a uniform length distribution (<task>_e).
_LONGBENCH_E_TASKS = frozenset(
    {
        "qasper",
        "multifieldqa_en",
        "hotpotqa",
        "2wikimqa",
        "gov_report",
        "multi_news",
        "trec",
        "triviaqa",
        "samsum",
        "passage_count",
        "passage_retrieval_en",
        "lcc",
        "repobench-p",
    }
)


@dataclass(frozen=True)
class LongBenchTask:
    """One LongBench task.

    `language` is "en", "zh" or "code" (LongBench counts the two code tasks apart from
    both languages). `raw_prompt` marks the tasks LongBench prompts without the chat
    template (see docs/EVALUATION.md: our Generator renders the template for every task).
    """

    name: str
    metric: str
    language: str
    category: str
    max_new_tokens: int
    prompt: str
    raw_prompt: bool
    first_line_only: bool
    in_longbench_e: bool

    def format_prompt(self, sample: dict[str, Any]) -> str:
        """The user message for one sample (LongBench's `prompt.format(**sample)`)."""
        return self.prompt.format(context=sample["context"], input=sample["input"])


def _task(
    name: str, metric: str, language: str, category: str, max_new_tokens: int, prompt: str
) -> LongBenchTask:
    return LongBenchTask(
        name=name,
        metric=metric,
        language=language,
        category=category,
        max_new_tokens=max_new_tokens,
        prompt=prompt,
        raw_prompt=name in _RAW_PROMPT_TASKS,
        first_line_only=name in _FIRST_LINE_TASKS,
        in_longbench_e=name in _LONGBENCH_E_TASKS,
    )


_TASK_LIST = (
    _task(
        "narrativeqa",
        "qa_f1",
        "en",
        "Single-Doc QA",
        128,
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    ),
    _task(
        "qasper",
        "qa_f1",
        "en",
        "Single-Doc QA",
        128,
        'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    ),
    _task(
        "multifieldqa_en",
        "qa_f1",
        "en",
        "Single-Doc QA",
        64,
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    ),
    _task(
        "multifieldqa_zh",
        "qa_f1_zh",
        "zh",
        "Single-Doc QA",
        64,
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    ),
    _task(
        "hotpotqa",
        "qa_f1",
        "en",
        "Multi-Doc QA",
        32,
        "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    ),
    _task(
        "2wikimqa",
        "qa_f1",
        "en",
        "Multi-Doc QA",
        32,
        "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    ),
    _task(
        "musique",
        "qa_f1",
        "en",
        "Multi-Doc QA",
        32,
        "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    ),
    _task(
        "dureader",
        "rouge_l_zh",
        "zh",
        "Multi-Doc QA",
        128,
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    ),
    _task(
        "gov_report",
        "rouge_l",
        "en",
        "Summarization",
        512,
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    ),
    _task(
        "qmsum",
        "rouge_l",
        "en",
        "Summarization",
        512,
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    ),
    _task(
        "multi_news",
        "rouge_l",
        "en",
        "Summarization",
        512,
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    ),
    _task(
        "vcsum",
        "rouge_l_zh",
        "zh",
        "Summarization",
        512,
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    ),
    _task(
        "trec",
        "classification",
        "en",
        "Few-shot Learning",
        64,
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    ),
    _task(
        "triviaqa",
        "qa_f1",
        "en",
        "Few-shot Learning",
        32,
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    ),
    _task(
        "samsum",
        "rouge_l",
        "en",
        "Few-shot Learning",
        128,
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    ),
    _task(
        "lsht",
        "classification",
        "zh",
        "Few-shot Learning",
        64,
        "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    ),
    _task(
        "passage_count",
        "count",
        "en",
        "Synthetic Tasks",
        32,
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    ),
    _task(
        "passage_retrieval_en",
        "retrieval",
        "en",
        "Synthetic Tasks",
        32,
        'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    ),
    _task(
        "passage_retrieval_zh",
        "retrieval_zh",
        "zh",
        "Synthetic Tasks",
        32,
        '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
    ),
    _task(
        "lcc",
        "code_sim",
        "code",
        "Code Completion",
        64,
        "Please complete the code given below. \n{context}Next line of code:\n",
    ),
    _task(
        "repobench-p",
        "code_sim",
        "code",
        "Code Completion",
        64,
        "Please complete the code given below. \n{context}{input}Next line of code:\n",
    ),
)

# In LongBench's order (the order of its tables).
TASKS: dict[str, LongBenchTask] = {task.name: task for task in _TASK_LIST}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
LONGBENCH_E_TASK_NAMES: tuple[str, ...] = tuple(t.name for t in _TASK_LIST if t.in_longbench_e)
LANGUAGES: tuple[str, ...] = ("en", "zh", "code")
