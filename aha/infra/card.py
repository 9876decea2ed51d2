"""Model cards: a `README.md` in the Hugging Face model-card format in every model dir aha saves
(`aha train`'s `model/` and each checkpoint's, `aha run`'s, `aha sft`, `aha distill`, the pipeline's
stages, `aha pretrain`).

The YAML front matter is written by huggingface_hub's `ModelCardData`: `library_name`, `tags`,
`base_model` when the starting model is named by a Hub id, a `model-index` with the held-out pass@1
(before and after, when `aha run` measured them), and an `aha:` block that holds the record itself —
base model, task, method and its key hyperparameters, steps, seed, pass@1, the aha version, the
command, and the one-line `summary` that `aha chat` and `aha serve` print. The text below it says
the same for people. transformers ignores the file: the dir loads unchanged (tested).

    aha.infra.card.summary("runs/demo/model")   # 'grpo on addition, 150 steps from the built-in base, seed 0; held-out
    pass@1 0.199 → 0.923'
"""

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aha

CARD = "README.md"
BUILTIN = "the built-in base"
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RL_KEYS = ("algo", "advantage", "ratio_level", "aggregation", "clip_low", "clip_high", "kl", "beta", "mu", "lr",
           "lr_schedule", "prompts_per_step", "group_size", "max_new_tokens", "temperature", "top_p", "template",
           "lora_rank", "dynamic_sampling", "overlong")
_command: list[str] | None = None


def record_command(argv: list[str]) -> None:
    """The CLI calls this once: the cards name the command that made the model."""
    global _command
    _command = list(argv)


def command_line() -> str:
    return (
        "aha " + shlex.join(_command) if _command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    )


@dataclass
class CardInfo:
    base_model: str                  # the model it started from: a dir or a Hub id; "" = the built-in base
    task: str
    method: str                      # grpo, dr_grpo, dapo, r1_zero, sft, distill, pretrain
    steps: int
    seed: int
    hyperparameters: dict = field(default_factory=dict)
    pass1_before: float | None = None
    pass1_after: float | None = None
    eval_protocol: str = ""          # e.g. "200 held-out problems × 4 samples, T 0.6, top-p 0.95"
    evals: list = field(default_factory=list)   # [{"step", "pass@1"}] measured during training
    note: str = ""


def summary_line(info: CardInfo) -> str:
    """The card's one line, which `aha chat` and `aha serve` print.

    >>> summary_line(CardInfo("", "addition", "grpo", 150, 0, pass1_before=0.199, pass1_after=0.923))
    'grpo on addition, 150 steps from the built-in base, seed 0; held-out pass@1 0.199 → 0.923'
    """
    line = f"{info.method} on {info.task}, {info.steps} steps from {info.base_model or BUILTIN}, seed {info.seed}"
    if info.pass1_after is not None:
        before = f"{info.pass1_before:.3f} → " if info.pass1_before is not None else ""
        line += f"; held-out pass@1 {before}{info.pass1_after:.3f}"
    elif info.evals:
        line += f"; held-out pass@1 {info.evals[-1]['pass@1']:.3f} at step {info.evals[-1]['step']}"
    return line


def rl_card(cfg, steps: int, evals: list | None = None, pass1_before: float | None = None,
            pass1_after: float | None = None) -> CardInfo:
    """The card of a model trained by `aha train` / `aha run` from its resolved config."""
    protocol = (f"{cfg.eval_problems} held-out problems × {cfg.eval_k} samples, T {cfg.eval_temperature}, top-p "
                f"{cfg.eval_top_p}")
    hyper = {key: getattr(cfg, key) for key in RL_KEYS} | {"reward_weights": cfg.component_weights()}
    return CardInfo(cfg.model, cfg.task, cfg.algo, steps, cfg.seed, hyper, pass1_before, pass1_after, protocol,
                    [{"step": e["step"], "pass@1": e["pass@1"]} for e in evals or []])


def front_matter(info: CardInfo) -> str:
    from huggingface_hub import EvalResult, ModelCardData
    task_slug = re.sub(r"[^A-Za-z0-9]+", "-", info.task).strip("-").lower()
    name = f"aha-{task_slug}-{info.method}"
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=f"aha/{info.task}",
            dataset_name=f"{info.task} (held out)",
            metric_type="pass@1",
            metric_value=value,
            metric_name=label,
        )
        for label, value in (("pass@1 before", info.pass1_before), ("pass@1 after", info.pass1_after))
        if value is not None
    ]
    hub_base = info.base_model if HUB_ID_RE.match(info.base_model) and not Path(info.base_model).exists() else None
    record = {"summary": summary_line(info), "base_model": info.base_model or BUILTIN, "task": info.task,
              "method": info.method, "steps": info.steps, "seed": info.seed, "pass1_before": info.pass1_before,
              "pass1_after": info.pass1_after, "eval_protocol": info.eval_protocol, "evals": info.evals,
              "hyperparameters": info.hyperparameters, "aha_version": aha.__version__, "command": command_line()}
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", base_model=hub_base,
                         tags=["aha", "reasoning", info.method, task_slug], model_name=name if results else None,
                         eval_results=results or None, aha=record)
    return data.to_yaml()


def card_text(info: CardInfo) -> str:
    """The whole README.md: front matter, then the same facts for people."""
    rows = [("base model", f"`{info.base_model}`" if info.base_model else BUILTIN), ("task", info.task),
            ("method", info.method), ("steps", str(info.steps)), ("seed", str(info.seed))]
    if info.pass1_after is not None:
        before = f"{info.pass1_before:.3f} → " if info.pass1_before is not None else ""
        rows.append(("held-out pass@1", f"{before}{info.pass1_after:.3f} ({info.eval_protocol})"))
    rows += [(f"held-out pass@1 at step {e['step']}", f"{e['pass@1']:.3f}") for e in info.evals]
    rows += [("aha version", aha.__version__), ("command", f"`{command_line()}`")]
    lines = ["---", front_matter(info).rstrip(), "---", "", f"# {info.method} on {info.task}", "",
             summary_line(info) + ".", ""]
    if info.note:
        lines += [info.note, ""]
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if info.hyperparameters:
        lines += ["## Hyperparameters", "", "| key | value |", "|---|---|",
                  *[f"| {k} | `{v}` |" for k, v in info.hyperparameters.items()], ""]
    lines += ["## Use", "", "A plain transformers dir: `AutoModelForCausalLM.from_pretrained(DIR)` and "
              "`AutoTokenizer.from_pretrained(DIR)` load it; `aha chat DIR` and `aha serve DIR` talk to it.", ""]
    return "\n".join(lines)


def write_card(model_dir: str | Path, info: CardInfo) -> Path:
    path = Path(model_dir) / CARD
    path.write_text(card_text(info), encoding="utf-8")
    return path


def save_model(model, tokenizer, model_dir: str | Path, info: CardInfo) -> None:
    """`save_pretrained` of both, then the card."""
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_card(model_dir, info)


def read_card(model_dir: str | Path) -> dict | None:
    """The `aha:` record of the dir's model card; None when it has no card aha wrote."""
    path = Path(model_dir) / CARD
    if not path.is_file():
        return None
    from huggingface_hub import ModelCard
    try:
        record = ModelCard.load(str(path)).data.to_dict().get("aha")
    except Exception:          # a card someone else wrote, with front matter we cannot read
        return None
    return record if isinstance(record, dict) else None


def summary(model_dir: str | Path) -> str | None:
    record = read_card(model_dir)
    return record.get("summary") if record else None
