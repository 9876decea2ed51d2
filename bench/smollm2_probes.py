"""The README's three SmolLM2 side figures, reproduced (each prints one line):

    python bench/smollm2_probes.py models/smollm2-135m-instruct

- format: the share of well-formed answers on the recipe's held-out questions when the prompt is
  R1-Zero's instruction as the system message, without the recipe's worked turn (32 × 2 at T 0.6);
- gap: mean / max |log p_sampler − log p_trainer| on the same sampled tokens, trainer in fp32 and
  under bf16 autocast (the sampler is fp32);
- matmul: 1024² fp32 and bf16 matmul GFLOP/s on this CPU.
"""

import sys
import time
from pathlib import Path

import torch

from aha.core.logprobs import completion_logprobs
from aha.core.rollout import generate, stop_strings, stop_token_ids
from aha.core.sampling import SamplingParams
from aha.eval.evaluate import EvalSpec, evaluate
from aha.infra.config import load_config
from aha.infra.model import load_model
from aha.tasks import get_task
from aha.tasks.templates import R1_ZERO, TemplatedTask

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2-135m-cpu.yaml"


def no_worked_turn(model, tokenizer, cfg, folder: Path) -> float:
    system = R1_ZERO.split(" User:")[0]
    path = folder / "r1_zero_chatml.txt"
    path.write_text(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{{question}}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    task = TemplatedTask(get_task(cfg.task, **cfg.task_options()), str(path), tokenizer)
    return evaluate(model, tokenizer, task, EvalSpec(32, 2, max_new_tokens=cfg.max_new_tokens))["format_rate"]


def gaps(model, tokenizer, cfg) -> dict[str, tuple[float, float]]:
    text = Path(cfg.template).read_text()
    task = get_task(cfg.task, **cfg.task_options())
    prompts = [tokenizer(text.replace("{question}", p.question), add_special_tokens=False).input_ids
               for p in task.eval_problems(2)]
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, 1.0, 0, stop_token_ids(model, tokenizer),
                            stop_strings(tokenizer))
    rollout = generate(model, prompts, 4, params, tokenizer.pad_token_id, seed=0, tokenizer=tokenizer)
    out = {}
    for name, on in (("fp32", False), ("bf16", True)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            logp, _, mask = completion_logprobs(model, rollout, torch.arange(8), cfg.temperature)
        diff = (logp - rollout.logprobs[:, :logp.shape[1]]).abs()[mask.bool()]
        out[name] = (diff.mean().item(), diff.max().item())
    return out


def matmul_gflops(dtype, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    import tempfile
    model, tokenizer = load_model(sys.argv[1], "cpu")
    model.eval()
    cfg = load_config(str(RECIPE))
    with tempfile.TemporaryDirectory() as folder:
        print(f"format rate without the worked turn: {no_worked_turn(model, tokenizer, cfg, Path(folder)):.3f}")
    for name, (mean, largest) in gaps(model, tokenizer, cfg).items():
        print(f"sampler/trainer gap, trainer {name}: mean {mean:.2e}, max {largest:.2e}")
    print(
        f"matmul 1024²: fp32 {matmul_gflops(torch.float32):.0f} GFLOP/s, bf16 {matmul_gflops(torch.bfloat16):.0f} "
        f"GFLOP/s"
    )


if __name__ == "__main__":
    main()
