"""The reward stage: shaping components, named pure reward terms added to a task's accuracy, each
logged on its own; and `Reward`, the run's whole reward (the task's components, the shaping ones,
their weighted sum), built once from the config and the task.

Each is a function of the completion text (or its length in tokens) and a few settings, returning
a float. Sources: R1 (format, language consistency), open-r1 `rewards.py` (tag count, repetition,
cosine), DAPO (soft overlong penalty), "Demystifying Long Chain-of-Thought Reasoning in LLMs"
(cosine length scaling).

Departures: the format and tag checks follow this project's one-line format
`<think>…</think> <answer>…</answer>` and do not ask for the newlines open-r1's patterns ask for.
Language consistency classifies sentences (split also where the script changes), not single
words, which a language identifier cannot tell apart; it uses `py3langid` (offline, ~3 MB).
"""

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from aha.infra.config import parse_reward_weights
from aha.infra.errors import AhaError
from aha.tasks.base import THINK_RE, Problem, Task

STRICT_RE = re.compile(r"<think>(.+?)</think>\s*<answer>(.+?)</answer>", re.DOTALL)
SOFT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"     # kana and Han: a word per character
WORD_RE = re.compile(rf"[{CJK}]|[^\W\d_{CJK}]+")
CJK_RE = re.compile(rf"[{CJK}]")
# Close languages the identifier confuses on short text: a chunk in any of them counts as the target.
CLOSE_LANGUAGES = [{"zh", "wuu", "yue"}, {"id", "ms"}, {"no", "nn"}, {"hr", "bs", "sr"}]
SENTENCE_RE = re.compile(r"[.!?;:\n。！？；：]+")


def format_strict(completion: str) -> float:
    """1.0 when the whole completion is a non-empty `<think>` then a non-empty `<answer>`, once each.

    >>> format_strict(" <think>2+2=4</think> <answer>4</answer>"), format_strict("<answer>4</answer>")
    (1.0, 0.0)
    >>> nested = "<think><think>a</think></think><answer>4</answer>"
    >>> format_strict("<think>a</think><answer>4</answer> and more"), format_strict(nested)
    (0.0, 0.0)
    """
    text = completion.strip()
    match = STRICT_RE.fullmatch(text)
    once = all(text.count(tag) == 1 for tag in TAGS)
    return float(bool(match and once and match.group(1).strip() and match.group(2).strip()))


def format_soft(completion: str) -> float:
    """1.0 when a `<think>…</think>` followed by an `<answer>…</answer>` appears anywhere.

    >>> format_soft("Sure! <think>x</think>\\n<answer>4</answer> done"), format_soft("<answer>4</answer>")
    (1.0, 0.0)
    """
    return float(bool(SOFT_RE.search(completion)))


def tag_count(completion: str) -> float:
    """0.25 for each of the four tags that appears exactly once (open-r1's `tag_count_reward`).

    >>> tag_count("<think>x</think> <answer>4</answer>"), tag_count("<think>x <answer>4</answer>")
    (1.0, 0.75)
    >>> tag_count("<think><think>x</think></think>"), tag_count("no tags")
    (0.0, 0.0)
    """
    return 0.25 * sum(completion.count(tag) == 1 for tag in TAGS)


@lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    return LanguageIdentifier.from_model_file(MODEL_FILE)     # our own: set_languages stays global


def _chunks(text: str, min_words: int = 8) -> list[tuple[str, int]]:
    """(text, word count) of the word groups to classify: sentences, cut where the script
    switches to or from CJK, then joined with their neighbours of the same script until each
    has `min_words` (a language identifier cannot place "Hmm, okay"; a paragraph it can)."""
    pieces = []                                   # [words, is_cjk, sentence ended], in order
    for sentence in SENTENCE_RE.split(text):
        for word in WORD_RE.findall(sentence):
            is_cjk = bool(CJK_RE.match(word))
            if pieces and pieces[-1][1] == is_cjk and not pieces[-1][2]:
                pieces[-1][0].append(word)
            else:
                pieces.append([[word], is_cjk, False])
        if pieces:
            pieces[-1][2] = True                  # the sentence ends here
    chunks = []                                   # [words, is_cjk]
    for words, is_cjk, _ in pieces:
        if chunks and chunks[-1][1] == is_cjk and len(chunks[-1][0]) < min_words:
            chunks[-1][0].extend(words)
        else:
            chunks.append([words, is_cjk])
    merged = []
    for words, is_cjk in chunks:                  # a short tail joins the chunk before it
        if merged and merged[-1][1] == is_cjk and len(words) < min_words:
            merged[-1][0].extend(words)
        else:
            merged.append([words, is_cjk])
    return [(("" if is_cjk else " ").join(words), len(words)) for words, is_cjk in merged]


def language_consistency(completion: str, language: str = "en") -> float:
    """Share of the chain-of-thought's words that are in `language` (ISO 639-1: en, zh, id, …).

    The chain of thought is the `<think>` content, or the whole completion when there is none.
    Words are runs of letters, or single Han/kana characters; numbers and symbols do not count.
    A chain of thought with no words scores 1.0: there is nothing in another language.

    >>> language_consistency("<think>First add the two numbers, then check the sum.</think><answer>4</answer>")
    1.0
    >>> language_consistency("<think>我们先把两个数字相加，然后检查结果。</think>", "en")
    0.0
    """
    think = THINK_RE.match(completion)
    text = think.group(1) if think else completion
    text = re.sub(r"</?(think|answer)>", " ", text)
    chunks = _chunks(text)
    total = sum(count for _, count in chunks)
    if total == 0:
        return 1.0
    identifier = _language_identifier()
    if language not in identifier.labels:
        raise AhaError(f"language_consistency: unknown language {language!r}; use an ISO 639-1 code such as en, zh, id")
    accepted = next((group for group in CLOSE_LANGUAGES if language in group), {language})
    matching = sum(count for text, count in chunks if identifier.classify(text)[0] in accepted)
    return matching / total


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_length − cache_length tokens, then falling
    linearly to −1 at max_length, and −1 beyond.

    >>> [overlong_penalty(n, 100, 20) for n in (50, 80, 90, 100, 130)]
    [0.0, 0.0, -0.5, -1.0, -1.0]
    """
    start = max_length - cache_length
    if length <= start:
        return 0.0
    if length > max_length or cache_length <= 0:
        return -1.0
    return (start - length) / cache_length


def repetition_penalty(completion: str, ngram_size: int = 3, max_penalty: float = -1.0) -> float:
    """open-r1's n-gram repetition penalty: max_penalty × (1 − distinct n-grams / all n-grams),
    over lower-cased whitespace words. 0 for text shorter than one n-gram.

    >>> repetition_penalty("a b c d e f"), repetition_penalty("a b a b a b", ngram_size=2)
    (0.0, -0.6)
    """
    words = completion.lower().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = list(zip(*[words[i:] for i in range(ngram_size)]))
    distinct = len(set(ngrams))
    return 0.0 if distinct == len(ngrams) else (1.0 - distinct / len(ngrams)) * max_penalty


def cosine_length(length: int, correct: bool, max_length: int,
                  correct_short: float = 1.0, correct_long: float = 0.5,
                  wrong_short: float = -1.0, wrong_long: float = -0.5) -> float:
    """Cosine length scaling ("Demystifying long CoT", as open-r1's `get_cosine_scaled_reward`):
    a right answer pays more when short, a wrong one is punished less when long (the model is
    encouraged to keep thinking when it is wrong). Lengths past max_length count as max_length.

    >>> [round(cosine_length(n, True, 100), 3) for n in (0, 50, 100)]
    [1.0, 0.75, 0.5]
    >>> [round(cosine_length(n, False, 100), 3) for n in (0, 50, 100)]
    [-1.0, -0.75, -0.5]
    """
    progress = min(length, max_length) / max_length
    cosine = math.cos(progress * math.pi)
    short, long = (correct_short, correct_long) if correct else (wrong_short, wrong_long)
    return long + 0.5 * (short - long) * (1.0 + cosine)


@dataclass(frozen=True)
class Completion:
    """What a shaping component may look at: the completion, its length in tokens, the budget, the
    task's verdict, and the run's settings for the components that take one."""
    text: str
    length: int
    max_length: int
    correct: bool
    language: str = "en"
    overlong_cache: int = 16


# Shaping components by the name `reward_weights` gives them: aha train reward_weights="accuracy=1,tag_count=0.25"
SHAPING = {
    "format_strict": lambda s: format_strict(s.text),
    "format_soft": lambda s: format_soft(s.text),
    "tag_count": lambda s: tag_count(s.text),
    "language": lambda s: language_consistency(s.text, s.language),
    "repetition": lambda s: repetition_penalty(s.text),
    "cosine": lambda s: cosine_length(s.length, s.correct, s.max_length),
    "overlong": lambda s: overlong_penalty(s.length, s.max_length, s.overlong_cache),
}


def fill_skipped(rewards: torch.Tensor, skip: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rewards (N,) for the group baseline: a skipped sample (skip (N,) bool; a `py:` reward function
    returned None) takes the mean of its group's other samples, so it moves neither the group
    mean nor, much, the spread. A group with every sample skipped keeps its rewards (all 0).

    >>> fill_skipped(torch.tensor([1., 0., 0., 5.]), torch.tensor([False, False, True, False]), 2).tolist()
    [1.0, 0.0, 5.0, 5.0]
    """
    grouped, skipped = rewards.view(-1, group_size), skip.view(-1, group_size)
    kept = (~skipped).float()
    mean = (grouped * kept).sum(dim=1, keepdim=True) / kept.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(skipped, mean.expand_as(grouped), grouped).reshape(-1)


@dataclass(frozen=True)
class Reward:
    """A run's reward, built once from its config and task (`Reward.build`): the task's own components,
    the shaping components of SHAPING that `reward_weights` names (DAPO's `overlong` under
    overlong=soft), an `env` tool's reward, and their weighted sum. A component no weight names
    weighs 0 but is still logged."""
    task: Task
    weights: dict[str, float]          # component name -> weight (Config.component_weights)
    shaping: tuple[str, ...]           # the SHAPING components this run computes, in SHAPING's order
    given: tuple[str, ...] = ()        # the names of the task's own components
    max_length: int = 64               # the token budget that `cosine` and `overlong` measure against
    language: str = "en"
    overlong_cache: int = 16

    @classmethod
    def build(cls, cfg, task: Task) -> "Reward":
        """The reward of `cfg` (an aha.infra.config.Config) on `task`. A `reward_weights` name that neither the
        task nor SHAPING gives is a typo that would silently weigh 0: an AhaError before anything runs.
        The task's names are its declared `components`, else those of scoring an empty answer."""
        weights, named = cfg.component_weights(), parse_reward_weights(cfg.reward_weights)
        given = task.components or tuple(task.score("", first_problem(task, cfg.seed)))
        listed = ", ".join(k for k in given if k != "skip")
        unknown = set(weights) - {"accuracy", "format", "env"} - set(SHAPING) - set(given)
        if unknown:
            raise AhaError(f"reward_weights names {', '.join(sorted(unknown))}, but task {cfg.task!r} gives the "
                           f"components {listed} and aha/tasks/rewards.py {', '.join(SHAPING)}")
        metric = cfg.dynamic_sampling_metric
        if cfg.dynamic_sampling and metric != "reward" and metric not in set(given) | set(named):
            raise AhaError(f"dynamic_sampling_metric={metric!r} is neither 'reward' nor a component of task "
                           f"{cfg.task!r} ({listed}) or of reward_weights")
        shaping = tuple(name for name in SHAPING if named.get(name) or (name == "overlong" and cfg.overlong == "soft"))
        return cls(task, weights, shaping, tuple(given), cfg.max_new_tokens, cfg.lang, cfg.overlong_cache)

    def score(self, texts: list[str], problems: list[Problem], lengths: list[int] | None = None,
              env: list[float] | None = None) -> tuple[list[dict], torch.Tensor]:
        """(reward components of each text (N,), their weighted sum (N,)). `problems[i]` is text i's
        problem; `lengths`: completion lengths in tokens (the length components need them); `env`:
        an env tool's reward per text (aha/core/tools/), or None."""
        scores = self.task.score_batch(texts, problems)
        shaping = [name for name in self.shaping if name not in scores[0]]     # a task's own name wins
        for name in shaping:
            for s, text, length in zip(scores, texts, lengths):
                seen = Completion(text, length, self.max_length, s["accuracy"] >= 1, self.language, self.overlong_cache)
                s[name] = SHAPING[name](seen)
        for s, value in zip(scores, env or ()):
            s["env"] = value
        total = torch.tensor([sum(self.weights.get(k, 0.0) * v for k, v in s.items()) for s in scores])
        return scores, total


def first_problem(task: Task, seed: int) -> Problem:
    """A problem to probe the task's component names with: its first held-out one, else its first training one."""
    return (task.eval_problems(1) or [next(iter(task.train_problems(seed)))])[0]
