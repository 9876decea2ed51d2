"""`aha plan` for each GPU recipe in recipes/, on the hardware it names: the table in the README.

No weights and no data are needed: each recipe's model is written as a config-only dir with the
published architecture (Qwen2.5-0.5B-Instruct, DeepSeek-R1-Distill-Qwen-1.5B, Qwen2.5-3B), and
the longest prompt is an estimate of the recipe's template + a long problem, in tokens.

    python bench/plan_recipes.py [--json plans.json]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from transformers import Qwen2Config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aha.core.plan_command import plan_command  # noqa: E402
from aha.infra.config import load_config  # noqa: E402

QWEN = dict(vocab_size=151_936, rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu")
# (recipe, model config, prompt tokens: template + a long problem, GPUs to check in GiB)
RECIPES = [
    (
        "qwen2.5-0.5b-instruct-gsm8k.yaml",
        Qwen2Config(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32_768,
            tie_word_embeddings=True,
            **QWEN,
        ),
        320,
        (24, 80),
    ),
    (
        "deepseek-r1-distill-qwen-1.5b-math.yaml",
        Qwen2Config(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=131_072,
            tie_word_embeddings=False,
            **QWEN,
        ),
        400,
        (80,),
    ),
    (
        "qwen2.5-3b-countdown-r1zero.yaml",
        Qwen2Config(
            hidden_size=2048,
            intermediate_size=11_008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=32_768,
            tie_word_embeddings=True,
            **QWEN,
        ),
        250,
        (80,),
    ),
]


def plan_recipes() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, config, prompt_tokens, gpus in RECIPES:
            model_dir = Path(tmp) / recipe
            config.save_pretrained(model_dir)
            cfg = load_config(str(REPO / "recipes" / recipe), {"model": str(model_dir)})
            for gib in gpus:
                result = plan_command(cfg, calibrate=False, device="cuda", device_gib=gib, prompt_tokens=prompt_tokens)
                rows.append({"recipe": recipe, "gpu_gib": gib, "prompt_tokens": prompt_tokens,
                             **{k: result[k] for k in ("parameters", "trainable", "static", "update", "rollout", "peak",
                                                       "fits", "micro_batch_rows", "largest_micro_batch")}})
    return rows


def markdown(rows: list[dict]) -> str:
    gib = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    lines = [
        "| recipe | GPU | parameters (trained) | static GiB | one micro-batch GiB | rollout GiB | peak GiB | fits | "
        "rows per micro-batch (largest) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['recipe']}` | {r['gpu_gib']} GB | {r['parameters'] / 1e9:.2f}B ({r['trainable'] / 1e6:.0f}M) | "
            f"{gib(r['static'])} | {gib(r['update'])} | {gib(r['rollout'])} | {gib(r['peak'])} | "
            f"{'yes' if r['fits'] else '**no**'} | {r['micro_batch_rows']} ({r['largest_micro_batch']}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = plan_recipes()
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
