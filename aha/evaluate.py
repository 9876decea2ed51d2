"""`aha eval`: R1's evaluation protocol on a task's held-out problems.

k samples per problem at temperature 0.6, top-p 0.95 (greedy decoding is avoided: it repeats and
has high variance); pass@1 = mean correctness over all k samples of all problems. Also: the
share of answers that reasoned in `<think>`, mean response tokens, truncation rate.
`prefill` forces the start of every response (e.g. " <think>" or " <answer>") to measure how
well the model does when it does or does not reason.
"""

from dataclasses import dataclass

import torch

from aha.progress import progress_bar
from aha.rollout import SamplingParams, generate
from aha.tasks.base import thought


@dataclass(frozen=True)
class EvalSpec:
    problems: int = 200
    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 64
    seed: int = 0
    prompts_per_batch: int = 64


def stop_ids(tokenizer) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id}
    answer_close = tokenizer.convert_tokens_to_ids("</answer>")
    if isinstance(answer_close, int) and answer_close != tokenizer.unk_token_id:
        ids.add(answer_close)
    return tuple(sorted(i for i in ids if i is not None))


def evaluate(model, tokenizer, task, spec: EvalSpec, prefill: str = "", console=None, label: str = "eval") -> dict:
    problems = task.eval_problems(spec.problems)
    params = SamplingParams(spec.max_new_tokens, spec.temperature, spec.top_p, 0, stop_ids(tokenizer))
    correct, lengths, thinking, truncated, samples = [], [], [], [], []
    was_training = model.training
    model.eval()
    with progress_bar(console) as bar:
        job = bar.add_task(label, total=len(problems))
        for start in range(0, len(problems), spec.prompts_per_batch):
            chunk = problems[start:start + spec.prompts_per_batch]
            prompts = [tokenizer(task.prompt(p) + prefill)["input_ids"] for p in chunk]
            rollout = generate(model, prompts, spec.k, params, tokenizer.pad_token_id, seed=spec.seed + start)
            texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            for i, text in enumerate(texts):
                problem = chunk[i // spec.k]
                text = prefill + text
                correct.append(task.score(text, problem)["accuracy"])
                thinking.append(float(thought(text)))
                if len(samples) < 8 and i % spec.k == 0:
                    samples.append({"prompt": task.prompt(problem), "completion": text, "answer": problem.answer, "correct": correct[-1]})
            lengths += rollout.lengths.tolist()
            truncated += rollout.truncated.float().tolist()
            bar.update(job, advance=len(chunk))
    model.train(was_training)
    n = len(correct)
    return {"pass@1": sum(correct) / n, "think_rate": sum(thinking) / n,
            "mean_response_tokens": sum(lengths) / n, "truncation_rate": sum(truncated) / n,
            "problems": len(problems), "k": spec.k, "temperature": spec.temperature,
            "top_p": spec.top_p, "samples": samples}
