"""`aha sample`: rejection sampling — R1's recipe for SFT data (and for distillation).

    aha sample --model runs/train --task addition --prompts 256 --k 8 --out kept.jsonl

k samples per prompt from the task's TRAINING stream (never its held-out problems); a sample is
kept only when the task verifies it (accuracy == 1) and it passes every filter:
  - format: the task's `format` score is 1 (or, for a task without one, `is_well_formed`);
  - not truncated, and at most `max_tokens` response tokens (0: no cap beyond max_new_tokens);
  - no degenerate repetition: the share of repeated word n-grams (open-r1's repetition measure,
    aha.tasks.rewards.repetition_penalty) is at most `max_repetition`;
  - optionally (`language`), language consistency of the reasoning ≥ `min_language`.
Identical responses to one prompt are kept once. Rows: `prompt`, `response`, and provenance
`model`, `task`, `seed`, `reward` (the verifiable reward: the task's accuracy), `accuracy`,
`scores` (every component the task reports). Counts of each rejection reason are returned.
"""

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aha.core.rollout import encode_prompt, generate, stop_strings, stop_token_ids
from aha.core.sampling import SamplingParams
from aha.infra.errors import AhaError
from aha.infra.progress import progress_bar
from aha.tasks.base import is_well_formed
from aha.tasks.rewards import language_consistency, repetition_penalty

# (prompt texts, k, seed) → for each prompt × k, grouped by prompt: (text, response tokens, truncated)
Completer = Callable[[list[str], int, int], list[tuple[str, int, bool]]]


@dataclass
class SampleConfig:
    model: str = ""
    task: str = "addition"
    task_options: dict = field(default_factory=dict)
    out: str = "samples.jsonl"
    prompts: int = 64
    k: int = 8
    temperature: float = 0.6          # R1's sampling settings
    top_p: float = 0.95
    max_new_tokens: int = 128
    max_tokens: int = 0               # length cap on kept responses (0: only "not truncated")
    ngram: int = 3
    max_repetition: float = 0.2       # share of repeated n-grams allowed
    language: str = ""                # e.g. "en": check language consistency of the reasoning
    min_language: float = 0.95
    seed: int = 0
    prompts_per_batch: int = 16


def rejection(text: str, length: int, truncated: bool, scores: dict, cfg: SampleConfig) -> str | None:
    """Why a sample is rejected (one word), or None to keep it."""
    if scores.get("accuracy", 0.0) < 1.0:
        return "wrong"
    if scores.get("format", float(is_well_formed(text))) < 1.0:
        return "format"
    if truncated or (cfg.max_tokens and length > cfg.max_tokens):
        return "length"
    if -repetition_penalty(text, cfg.ngram, max_penalty=-1.0) > cfg.max_repetition:
        return "repetition"
    if cfg.language and language_consistency(text, cfg.language) < cfg.min_language:
        return "language"
    return None


def model_completer(model, tokenizer, cfg: SampleConfig, adds_special_tokens: bool = True) -> Completer:
    """Sampling with aha's rollout engine, stopping at EOS or `</answer>`; prompts encoded as training
    encodes them (`adds_special_tokens`: the task's, False under a chat template)."""
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, 0, stop_token_ids(model, tokenizer),
                            stop_strings(tokenizer))

    def complete(prompts: list[str], k: int, seed: int) -> list[tuple[str, int, bool]]:
        ids = [encode_prompt(tokenizer, p, adds_special_tokens) for p in prompts]
        rollout = generate(model, ids, k, params, tokenizer.pad_token_id, seed=seed, tokenizer=tokenizer)
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        return list(zip(texts, rollout.lengths.tolist(), rollout.truncated.tolist()))
    return complete


def sample_rows(task, complete: Completer, cfg: SampleConfig, model_name: str, console=None) -> tuple[list[dict], dict]:
    """(kept rows, stats) for cfg.prompts training problems × cfg.k samples."""
    stream = task.train_problems(cfg.seed)
    problems = [next(stream) for _ in range(cfg.prompts)]
    rows, reasons = [], Counter()
    with progress_bar(console) as bar:
        job = bar.add_task("sample", total=len(problems))
        for start in range(0, len(problems), cfg.prompts_per_batch):
            chunk = problems[start:start + cfg.prompts_per_batch]
            prompts = [task.prompt(p) for p in chunk]
            results = complete(prompts, cfg.k, cfg.seed + start)
            for i, (problem, prompt) in enumerate(zip(chunk, prompts)):
                seen = set()
                for text, length, truncated in results[i * cfg.k:(i + 1) * cfg.k]:
                    scores = task.score(text, problem)
                    reason = rejection(text, length, truncated, scores, cfg) or ("duplicate" if text in seen else None)
                    reasons[reason or "kept"] += 1
                    if reason is None:
                        seen.add(text)
                        rows.append({"prompt": prompt, "response": text, "model": model_name, "task": cfg.task,
                                     "seed": cfg.seed, "reward": scores["accuracy"], "accuracy": scores["accuracy"],
                                     "scores": scores})
            bar.update(job, advance=len(chunk))
    stats = {"prompts": len(problems), "samples": len(problems) * cfg.k, "kept": len(rows),
             "prompts_with_a_kept_sample": len({r["prompt"] for r in rows}),
             "rejected": {k: v for k, v in sorted(reasons.items()) if k != "kept"}}
    return rows, stats


def write_rows(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def rejection_sample(cfg: SampleConfig, console=None) -> dict:
    from aha.infra.model import detect_device, load_model
    from aha.tasks import get_task
    if cfg.k < 1 or cfg.prompts < 1:
        raise AhaError("sample: --k and --prompts must be at least 1")
    task = get_task(cfg.task, **cfg.task_options)
    model, tokenizer = load_model(cfg.model, detect_device())
    model.eval()
    complete = model_completer(model, tokenizer, cfg, task.adds_special_tokens)
    rows, stats = sample_rows(task, complete, cfg, str(cfg.model), console)
    write_rows(rows, cfg.out)
    return {**stats, "out": str(cfg.out)}
