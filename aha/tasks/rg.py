"""`rg:NAME`: any of reasoning-gym's ~100 procedural tasks (`pip install reasoning-gym`).

    get_task("rg:leg_counting")
    get_task("rg:basic_arithmetic", config={"min_terms": 2, "max_terms": 3})

Problems are generated locally, nothing is downloaded. The score is the dataset's own
`score_answer(answer, entry)` (some tasks give partial credit in [0, 1]) on the `<answer>` text.
Departure: reasoning-gym's default scorer, which about a third of its datasets keep, pays
len(gold)/len(answer) to any answer that contains the gold ("0 or 162", a list of every number);
those datasets are scored by exact match here. Datasets with a scorer of their own keep it:
`aha check-reward rg:NAME` shows whether it can be gamed (rg:spell_backward's prefix credit can,
and so can rg:chain_sum's decimal credit); `exact=True` (`task_config: {exact: true}`) scores any
dataset by exact match of the answer text.

Held-out split: the evaluation set is the first `eval_size` items of the dataset built with a
seed of its own; the training stream is built from seeds derived from the training seed, and
drops any item whose question is in the evaluation set (reasoning-gym item i of seed s is often
item i+1 of seed s−1, so different seeds alone would not keep them apart).
"""

import random
from collections.abc import Iterator

from aha.infra.errors import AhaError
from aha.tasks.base import Problem, Task, extract_answer, is_well_formed

EVAL_SEED = 987_654_321
CHUNK = 1000


class ReasoningGymTask(Task):
    def __init__(self, dataset: str, eval_size: int = 200, config: dict | None = None, exact: bool = False):
        try:
            import reasoning_gym
        except ImportError as exc:
            raise AhaError("rg: tasks need reasoning-gym: pip install reasoning-gym") from exc
        from reasoning_gym.factory import DATASETS
        if dataset not in DATASETS:
            raise AhaError(f"rg:{dataset} is not a reasoning-gym dataset; choose one of: {', '.join(sorted(DATASETS))}")
        self.name, self.dataset_name, self.config = f"rg:{dataset}", dataset, dict(config or {})
        self.eval_size = eval_size
        self._create = reasoning_gym.create_dataset
        from reasoning_gym.dataset import ProceduralDataset
        # exact=True: the answer must equal the gold text; a dataset's own scorer may pay partial
        # credit to hedges (chain_sum: '<answer>1 or 0</answer>' earns 1/6, `aha check-reward`)
        self.exact_match = exact or DATASETS[dataset][0].score_answer is ProceduralDataset.score_answer
        try:
            self.eval_dataset = self._create(dataset, size=eval_size, seed=EVAL_SEED, **self.config)
        except Exception as exc:       # bad config keys or values
            raise AhaError(f"rg:{dataset}: cannot build the dataset with config {self.config}: {exc}") from exc
        self.heldout = [self._problem(self.eval_dataset[i]) for i in range(eval_size)]
        self.heldout_questions = {p.question for p in self.heldout}

    def _problem(self, entry: dict) -> Problem:
        return Problem(question=entry["question"], answer=str(entry["answer"]), meta={"entry": entry})

    def train_problems(self, seed: int) -> Iterator[Problem]:
        seeds = random.Random(f"rg/{seed}")
        while True:
            dataset = self._create(self.dataset_name, size=CHUNK, seed=seeds.randrange(2**31), **self.config)
            for i in range(CHUNK):
                problem = self._problem(dataset[i])
                if problem.question not in self.heldout_questions:
                    yield problem

    def eval_problems(self, n: int) -> list[Problem]:
        if n > self.eval_size:
            raise AhaError(
                f"{self.name}: asked for {n} evaluation problems but eval_size={self.eval_size}; raise eval_size"
            )
        return self.heldout[:n]

    def prompt(self, problem: Problem) -> str:
        return f"User: {problem.question}\nAssistant:"

    def score(self, completion: str, problem: Problem) -> dict[str, float]:
        answer = extract_answer(completion)
        try:
            if answer is None:
                accuracy = 0.0
            elif self.exact_match:                 # the default scorer's substring credit is gameable
                accuracy = float(answer == str(problem.meta["entry"]["answer"]))
            else:
                accuracy = float(self.eval_dataset.score_answer(answer, problem.meta["entry"]))
        except Exception:      # a scorer that chokes on hostile text: that answer is wrong
            accuracy = 0.0
        if not 0.0 <= accuracy <= 1.0:       # NaN included
            accuracy = 0.0
        return {"accuracy": accuracy, "format": float(is_well_formed(completion))}
