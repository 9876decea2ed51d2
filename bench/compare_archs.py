"""Compare the built-in architectures on the same corpus and budget, side by side in one process.

    python bench/compare_archs.py --steps 500

For each of gpt2, qwen2, deepseek_v3 (MLA + MoE): pretrain with `aha pretrain`'s defaults but
`--steps`, then held-out pass@1 when forced to reason (`prefill " <think>"`) and as is.
Prints a markdown table and writes bench/compare_archs.json.
"""

import argparse
import json
import tempfile
from pathlib import Path

from aha.eval.evaluate import EvalSpec, evaluate
from aha.infra.model import load_model
from aha.stages.pretrain import PretrainConfig, pretrain
from aha.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--archs", default="gpt2,qwen2,deepseek_v3")
    args = parser.parse_args()
    rows = []
    task = get_task("addition")
    for arch in args.archs.split(","):
        out = Path(tempfile.mkdtemp()) / arch
        stats = pretrain(PretrainConfig(out=str(out), arch=arch, steps=args.steps))
        model, tokenizer = load_model(out)
        spec = EvalSpec(problems=200, k=4)
        think = evaluate(model, tokenizer, task, spec, prefill=" <think>")["pass@1"]
        as_is = evaluate(model, tokenizer, task, spec)["pass@1"]
        rows.append({**stats, "pass1_forced_think": think, "pass1_as_is": as_is,
                     "seconds_per_step": stats["seconds"] / stats["steps"]})
    print("| arch | parameters | s/step | tokens/s | val loss | pass@1 forced to reason | pass@1 as is |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arch']} | {r['parameters'] / 1e6:.2f}M | {r['seconds_per_step']:.3f} | {r['tokens_per_second']} | "
            f"{r['val_loss']:.3f} | {r['pass1_forced_think']:.3f} | {r['pass1_as_is']:.3f} |"
        )
    Path("bench/compare_archs.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
