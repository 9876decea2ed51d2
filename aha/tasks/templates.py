"""Prompt templates: how a task's question is shown to the model (config `template`, `think_prefill`).

    task      the task's own `prompt()`: `User: {question}\\nAssistant:` for the built-in tasks (default)
    r1_zero   the full R1-Zero prompt of the DeepSeek-R1 paper (Table 1), system text included
    chat      the tokenizer's chat template, the question as the one user message (instruct models)
    PATH      a text file holding `{question}`

`think_prefill=true` appends `<think>` to the prompt, so every completion starts inside the
reasoning; the reward then scores `<think>` + completion, so the format reward still sees the tag,
and so do the think rates of training and evaluation (`prompt_prefill`).

    aha train --model DIR --task gsm8k data=train.jsonl template=chat think_prefill=true
"""

from dataclasses import dataclass
from pathlib import Path

from aha.infra.errors import AhaError
from aha.tasks.base import Problem, Task

R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
           "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
           "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
           "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
           "User: {question}. Assistant:")
NAMED = ("task", "r1_zero", "chat")


def read_template(template: str) -> str | None:
    """The template text for r1_zero or a file; None for `task` and `chat`. Errors name the fix."""
    if template in ("task", "chat"):
        return None
    if template == "r1_zero":
        return R1_ZERO
    path = Path(template)
    if not path.is_file():
        raise AhaError(f"config: template={template!r} is neither one of {', '.join(NAMED)} nor a file")
    text = path.read_text()
    if "{question}" not in text:
        raise AhaError(f"config: template file {path} has no {{question}} placeholder")
    return text


def prefill_text(prompt: str) -> str:
    """`<think>`, after a space unless the prompt already ends in whitespace."""
    return "<think>" if not prompt or prompt[-1].isspace() else " <think>"


@dataclass
class TemplatedTask(Task):
    """A task seen through a template: `prompt()` renders the template, `score()` scores the
    prefill plus the completion. Everything else (problems, eval set, name, hooks) is the task's own."""
    task: Task
    template: str
    tokenizer: object
    think_prefill: bool = False
    tools: list | None = None      # function schemas the chat template lists (tool_format=chat, aha/core/tools/)

    def __post_init__(self):
        self.text = read_template(self.template)
        if self.template == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise AhaError("template=chat: this tokenizer has no chat template; use template=r1_zero or a file")

    def base_prompt(self, problem: Problem) -> str:
        if self.template == "task":
            return self.task.prompt(problem)
        if self.template == "chat":
            return self.tokenizer.apply_chat_template([{"role": "user", "content": problem.question}], tools=self.tools,
                                                      tokenize=False, add_generation_prompt=True)
        return self.text.replace("{question}", problem.question)   # not str.format: questions hold braces

    def prefill(self, problem: Problem) -> str:
        return prefill_text(self.base_prompt(problem)).strip() if self.think_prefill else ""

    def prompt(self, problem: Problem) -> str:
        prompt = self.base_prompt(problem)
        return prompt + prefill_text(prompt) if self.think_prefill else prompt

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        return self.task.score(self.prefill(problem) + completion, problem)

    def score_batch(self, completions: list[str], problems: list[Problem]) -> list[dict[str, float]]:
        return self.task.score_batch([self.prefill(p) + c for c, p in zip(completions, problems)], problems)

    @property
    def adds_special_tokens(self) -> bool:
        """A chat template writes its own BOS/role tokens; the tokenizer must not add another BOS."""
        return self.template != "chat"

    # the task's own
    name = property(lambda self: self.task.name)
    components = property(lambda self: self.task.components)
    skipped_rows = property(lambda self: self.task.skipped_rows)
    writes_corpus = property(lambda self: self.task.writes_corpus)

    def train_problems(self, seed: int):
        return self.task.train_problems(seed)

    def eval_problems(self, n: int) -> list[Problem]:
        return self.task.eval_problems(n)

    def corpus_document(self, problem: Problem, think: bool) -> str:
        return self.task.corpus_document(problem, think)

    def __getattr__(self, name):
        if name == "task":            # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)


def prompt_prefill(task, problem: Problem) -> str:
    """What the prompt itself opened the response with (`<think>` under think_prefill, else ""):
    the metrics that read a whole response (think rate, reflection) must see it, and the decoded
    completion alone lacks it."""
    return task.prefill(problem) if isinstance(task, TemplatedTask) else ""


def apply_template(task, tokenizer, template: str = "task", think_prefill: bool = False, tools: list | None = None):
    """The task itself when nothing changes (the built-in behaviour), else a `TemplatedTask`.
    `tools`: function schemas for the chat template (aha/core/tools/ `tool_schemas`)."""
    if template == "task" and not think_prefill:
        return task
    return TemplatedTask(task, template, tokenizer, think_prefill, tools)
