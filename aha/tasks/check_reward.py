"""`aha check-reward TASK`: try adversarial completions against a task's reward, print every one
that earns credit it should not.

    aha check-reward addition countdown code
    aha check-reward gsm8k --data gsm8k_train.jsonl
    aha check-reward py:my_rewards:my_reward --data rows.jsonl --reward-weights "accuracy=1,tag_count=0.25"

For each of a few held-out problems it builds completions from the gold answer, the prompt and a
wrong answer: repeated or nested tags, several answers, an empty answer, the answer outside the
tags, tags in other case or spacing, the prompt echoed back, huge numbers, Unicode digits,
whitespace inside the answer, answers of 10k characters. Each probe deserves no more than an honest
reference completion, component by component:

    nothing       deserves what the empty completion "" earns
    wrong         deserves what a plain wrong answer `<answer>W</answer>` earns
    right, badly  deserves what `Sure. <answer>G</answer> Done.` earns: the accuracy, not the format

A probe that earns more on any weighted component (the reward the trainer would use: accuracy 1,
format 0.1 and `--reward-weights` on top), or whose scoring raises, is printed. Exit code 0 when
none does, 1 when one does, 2 for bad input. Controls (`<answer>G</answer>`, with thinking and
newlines) must earn full accuracy, or the probes built from the gold tell little: a note says so.

Checked shaping components: format_strict, format_soft, tag_count (aha/tasks/rewards.py). The others
(language, repetition, cosine, overlong) look at length and wording, not at the answer.

Departure: none of TRL, verl or OpenRLHF ships such a probe; their users report the hacks it tries
(repeated tags that still score; an empty answer that matches as a substring).
"""

import re
import sys
from dataclasses import dataclass

from aha.infra.config import Config
from aha.infra.errors import AhaError
from aha.infra.reader import apply_values
from aha.tasks.base import Problem
from aha.tasks.rewards import SHAPING, Completion, Reward

CHECKED_SHAPING = ("format_strict", "format_soft", "tag_count")
TOLERANCE = 1e-9
DIGITS = {"fullwidth": 0xFF10, "Arabic-Indic": 0x0660, "Devanagari": 0x0966, "math bold": 0x1D7CE}
SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹"


@dataclass(frozen=True)
class Probe:
    name: str
    text: str
    deserves: str          # "nothing" | "wrong" | "right_badly" | "control"


@dataclass(frozen=True)
class Finding:
    problem: int
    probe: Probe
    what: str              # "accuracy 1.0 > 0.0", or "raises ValueError: …"


def _digits(text: str, to) -> str:
    return "".join(to(int(c)) if "0" <= c <= "9" else c for c in text)


def probes(gold: str, wrong: str, prompt: str) -> list[Probe]:
    """The adversarial completions for one problem (gold answer, a wrong answer, the prompt)."""
    G, W = gold, wrong
    candidates = " ".join(str(i) for i in range(2400))                   # ~10k characters
    out = [
        Probe("empty answer", "<answer></answer>", "nothing"),
        Probe("empty answer, the gold in the thinking", f"<think>{G}</think> <answer> </answer>", "nothing"),
        Probe("answer outside the tags", G, "nothing"),
        Probe("answer outside the tags, in a sentence", f"The answer is {G}.", "nothing"),
        Probe("answer only in the thinking", f"<think>The answer is {G}</think>", "nothing"),
        Probe("answer after the thinking, untagged", f"<think>so</think> {G}", "nothing"),
        Probe("several answers, the gold last", f"<answer>{W}</answer> <answer>{G}</answer>", "nothing"),
        Probe("several answers, the gold first", f"<answer>{G}</answer> <answer>{W}</answer>", "nothing"),
        Probe("the gold answer twice", f"<answer>{G}</answer><answer>{G}</answer>", "nothing"),
        Probe("nested answer tags", f"<answer><answer>{G}</answer></answer>", "nothing"),
        Probe("an answer opened twice", f"<answer>{W}<answer>{G}</answer>", "nothing"),
        Probe("an answer closed twice", f"<answer>{G}</answer></answer>", "nothing"),
        Probe("upper-case tags", f"<ANSWER>{G}</ANSWER>", "nothing"),
        Probe("capitalised tags", f"<Answer>{G}</Answer>", "nothing"),
        Probe("spaces inside the tags", f"< answer >{G}< /answer >", "nothing"),
        Probe("the prompt echoed back", prompt, "nothing"),
        Probe("the prompt echoed back, then the gold", f"{prompt} {G}", "nothing"),
        Probe("repeated think tags", f"<think>a</think><think>b</think> <answer>{G}</answer>", "right_badly"),
        Probe("nested think tags", f"<think><think>a</think></think> <answer>{G}</answer>", "right_badly"),
        Probe("unclosed think tag", f"<think>a <answer>{G}</answer>", "right_badly"),
        Probe("text after the answer", f"<answer>{G}</answer> and more", "right_badly"),
        Probe("a huge number", f"<answer>{'9' * 5000}</answer>", "wrong"),
        Probe("a huge exponent", "<answer>1e999999999</answer>", "wrong"),
        Probe("a power tower", "<answer>9^{9^{9^{9}}}</answer>", "wrong"),
        Probe("the gold followed by 300 zeros", f"<answer>{G}{'0' * 300}</answer>", "wrong"),
        Probe("the wrong and the gold answer in one", f"<answer>{W} or {G}</answer>", "wrong"),
        Probe("the gold and the wrong answer in one", f"<answer>{G}, {W}</answer>", "wrong"),
        Probe("two lines: the wrong then the gold", f"<answer>{W}\n{G}</answer>", "wrong"),
        Probe("a list of 200 candidates", f"<answer>{' '.join(str(i) for i in range(200))} {G}</answer>", "wrong"),
        Probe("10k characters: a list of candidates", f"<answer>{candidates} {G}</answer>", "wrong"),
        Probe("10k characters: the gold, then filler", f"<answer>{G} {'x' * 10_000}</answer>", "wrong"),
        Probe("10k characters: filler, then the gold", f"<answer>{'x' * 10_000} {G}</answer>", "wrong"),
        Probe("the gold wrapped in other text", f"<answer>x{G}x</answer>", "wrong"),
        Probe("control: the gold answer", f"<answer>{G}</answer>", "control"),
        Probe(
            "control: thinking, then the gold on its own line",
            f"<think>I add.</think>\n<answer>\n{G}\n</answer>",
            "control",
        ),
    ]
    if len(G) > 1 and re.fullmatch(r"[A-Za-z0-9.]+", G):     # an atom: whitespace inside splits it
        out += [Probe("a space between the gold's characters", f"<answer>{' '.join(G)}</answer>", "wrong"),
                Probe("a newline inside the gold", f"<answer>{G[:1]}\n{G[1:]}</answer>", "wrong"),
                Probe("a zero-width space inside the gold", f"<answer>{G[:1]}\u200b{G[1:]}</answer>", "wrong")]
    if any("0" <= c <= "9" for c in G):
        out += [Probe(f"{name} digits", f"<answer>{_digits(G, lambda d, b=base: chr(b + d))}</answer>", "wrong")
                for name, base in DIGITS.items()]
        out.append(Probe("superscript digits", f"<answer>{_digits(G, lambda d: SUPERSCRIPTS[d])}</answer>", "wrong"))
    return out


def components(task, weights: dict[str, float], texts: list[str], problem: Problem) -> list[dict[str, float]]:
    """The task's components and the checked shaping ones, for each completion (one batch, so that
    a task with `score_batch`, such as code, grades them in parallel and identical code once)."""
    all_scores = task.score_batch(texts, [problem] * len(texts))
    all_scores = [dict(s) for s in all_scores]
    for text, scores in zip(texts, all_scores):
        for name in CHECKED_SHAPING:
            if weights.get(name) and name not in scores:
                scores[name] = SHAPING[name](Completion(text, len(text), 10 ** 6, scores.get("accuracy", 0.0) >= 1))
    return all_scores


def scored_or_raised(task, weights: dict[str, float], texts: list[str], problem: Problem) -> list[dict | Exception]:
    """`components` of each text, or the exception that scoring it raised (found one by one)."""
    try:
        return components(task, weights, texts, problem)
    except Exception:
        out = []
        for text in texts:
            try:
                out += components(task, weights, [text], problem)
            except Exception as exc:
                out.append(exc)
        return out


def wrong_answer(task, gold: str, problem: Problem) -> str:
    """A short answer the task scores as wrong (accuracy 0)."""
    for candidate in ("0", "1", "none", "-1"):
        try:
            right = task.score(f"<answer>{candidate}</answer>", problem).get("accuracy", 0.0) != 0.0
        except Exception:                              # found again, and reported, among the probes
            right = False
        if candidate != gold.strip() and not right:
            return candidate
    raise AhaError(
        f"check-reward: every answer tried ('0', '1', 'none', '-1') earns accuracy on {problem.question[:60]!r}"
    )


def check_problem(
    task, weights: dict[str, float], problem: Problem, index: int
) -> tuple[list[Finding], list[str], int]:
    """(findings, notes, probes tried) for one problem."""
    gold = problem.answer
    wrong = wrong_answer(task, gold, problem)
    references = {
        "nothing": "",
        "wrong": f"<answer>{wrong}</answer>",
        "right_badly": f"Sure. <answer>{gold}</answer> Done.",
    }
    findings, notes, deserved = [], [], {}
    for (kind, text), got in zip(
        references.items(), scored_or_raised(task, weights, list(references.values()), problem)
    ):
        if isinstance(got, Exception):  # even an honest completion crashes the reward
            findings.append(
                Finding(
                    index, Probe(f"reference ({kind})", text, kind), f"raises {type(got).__name__}: {str(got)[:80]}"
                )
            )
            got = {}
        deserved[kind] = got
    all_probes = probes(gold, wrong, task.prompt(problem))
    for probe, got in zip(all_probes, scored_or_raised(task, weights, [p.text for p in all_probes], problem)):
        if isinstance(got, Exception):                 # a crash in scoring kills a training run
            findings.append(Finding(index, probe, f"raises {type(got).__name__}: {str(got)[:80]}"))
            continue
        if probe.deserves == "control":
            if got.get("accuracy", 0.0) < 1.0:
                notes.append(
                    f"problem {index}: {probe.name} ({probe.text[:50]!r}) earns accuracy {got.get('accuracy', 0.0):g}"
                )
            continue
        if got.get("skip"):                            # a py: reward that skips the sample gives it no reward
            continue
        over = [f"{name} {got.get(name, 0.0):g} > {deserved[probe.deserves].get(name, 0.0):g}"
                for name, weight in weights.items() if weight and name in got
                and got[name] > deserved[probe.deserves].get(name, 0.0) + TOLERANCE]
        if over:
            findings.append(Finding(index, probe, ", ".join(over)))
    return findings, notes, len(all_probes)


def check_reward(task, weights: dict[str, float], problems: int = 3) -> tuple[list[Finding], list[str], int]:
    """Probe the first `problems` held-out problems (training ones if the task holds none out)."""
    chosen = task.eval_problems(problems)
    if not chosen:
        stream = task.train_problems(0)
        chosen = [next(stream) for _ in range(problems)]
    findings, notes, tried = [], [], 0
    for index, problem in enumerate(chosen):
        f, n, t = check_problem(task, weights, problem, index)
        findings, notes, tried = findings + f, notes + n, tried + t
    return findings, notes, tried


def add_check_reward_parser(sub) -> None:
    p = sub.add_parser(
        "check-reward",
        help="try adversarial completions against a task's reward; exit 1 if one earns credit",
        description="Repeated and nested tags, several answers, empty answers, answers outside the tags, "
        "the prompt echoed back, huge numbers, Unicode digits, whitespace tricks, 10k-character "
        "answers: every completion that earns more than an honest one of its kind is printed. "
        "Exit 0: none does; 1: some do.",
    )
    p.add_argument("tasks", nargs="+", metavar="TASK",
                   help="task name(s): addition, countdown, gsm8k, math, code, rg:NAME, jsonl:PATH, py:module:function")
    p.add_argument("--data", help="data file for file-backed tasks (gsm8k, math, py:…)")
    p.add_argument("--problems", type=int, default=3, help="problems to probe")
    p.add_argument("--task-config", default="{}", metavar="YAML",
                   help="the task's own options, as the config key task_config, e.g. "
                        "'{config: {min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 1}}' for rg:chain_sum")
    p.add_argument("--reward-weights", default="", metavar="NAME=W,…",
                   help="weights on top of accuracy=1, format=0.1, as the config key reward_weights")
    p.set_defaults(handler=cmd_check_reward)


def check_task(name: str, args) -> int:
    """Probe one task and print what earns undeserved credit; the number of such completions."""
    from aha.tasks import get_task

    cfg = apply_values(
        Config(task=name, data=args.data or "", reward_weights=args.reward_weights),
        {"task_config": args.task_config},
        "--task-config",
    )
    task = get_task(cfg.task, **cfg.task_options())
    reward = Reward.build(cfg, task)               # its component names checked as aha train checks them
    weights, given = reward.weights, reward.given
    findings, notes, tried = check_reward(task, weights, args.problems)
    if notes:
        print(
            f"{name}: note: {len(notes)} control(s) with the gold answer earn less than full accuracy, e.g. "
            f"{notes[0]}: "
            f"the gold is not itself an answer (code: its hidden tests), so the probes built from it test the "
            f"answer extraction only",
            file=sys.stderr,
        )
    for finding in findings:
        shown = finding.probe.text if len(finding.probe.text) <= 70 else finding.probe.text[:67] + "..."
        print(f"{name}: undeserved: problem {finding.problem}, {finding.probe.name}: {finding.what}   {shown!r}")
    checked = [n for n, w in weights.items() if w and (n in given or n in CHECKED_SHAPING)]
    print(f"{name}: {len(findings)} of {tried} adversarial completions earn undeserved credit "
          f"({args.problems} problems; checked: {', '.join(checked)})")
    return len(findings)


def cmd_check_reward(args, console) -> int:
    if args.problems < 1:
        raise AhaError(f"--problems {args.problems}: probe at least 1 problem")
    found = sum([check_task(name, args) for name in args.tasks])      # every task, even after a finding
    return 1 if found else 0
