"""One flat, typed config for training: defaults defined once here, then a preset (`algo`),
then a YAML file, then `key=value` overrides, in that order. The resolved config is saved in
the run folder as `config.yaml`.

    aha train --config my.yaml lr=1e-5 group_size=16
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import yaml

from aha.infra.errors import AhaError
from aha.infra.reader import apply_values, coerce, read_yaml_mapping

OVERLONG = ("none", "mask", "soft")


@dataclass
class Config:
    # names users bring from TRL and other tools, for a better "did you mean"
    ALIASES: ClassVar[dict[str, str]] = {
        "learning_rate": "lr", "num_generations": "group_size", "max_completion_length": "max_new_tokens",
        "epsilon": "clip_low", "epsilon_high": "clip_high", "num_iterations": "mu", "loss_type": "algo",
        "max_steps": "steps", "output_dir": "out", "model_name_or_path": "model"}
    HELP: ClassVar[str] = "; see `aha train --help`"
    # what to train
    model: str = ""                  # a transformers model dir; "" = the built-in base model
    task: str = "addition"
    data: str = ""                   # file-backed tasks: JSONL / Parquet / HF dataset dir
    eval_data: str = ""              # optional separate held-out file
    skip_bad_rows: bool = False      # skip and count rows without an answer instead of stopping
    task_config: dict = field(default_factory=dict)   # the task's own keyword options: {digits: 4} for addition;
                                     # {eval_size: 100, config: {min_terms: 2}} (reasoning-gym's dataset config)
    template: str = "task"  # prompt: task (its own) | r1_zero | chat | PATH with {question}; aha/tasks/templates.py
    think_prefill: bool = False      # append <think> to every prompt
    out: str = "runs/train"
    seed: int = 0
    # the RL loop
    steps: int = 150
    prompts_per_step: int = 8
    group_size: int = 8              # G samples per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    lr: float = 1e-4
    lr_schedule: str = "constant"    # constant | linear | cosine (aha/core/schedule.py), per RL step
    warmup_steps: int = 0            # linear warm-up steps before the schedule
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # the algorithm (see aha/core/algos.py); `algo` names a preset in aha/core/presets.py
    algo: str = "grpo"
    advantage: str = "grpo"
    ratio_level: str = "token"
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: str = "seq_mean"
    kl: str = "k3"
    beta: float = 0.0
    mu: int = 1                      # inner updates per rollout
    surrogate: str = "clip"          # the per-token objective: clip | cispo | sapo | gmpo | vespo | clip_cov | kl_cov
    dual_clip: float = 0.0           # c > 1: for A < 0 the clip loss is at most −c·A (verl's dual-clip, c = 3); 0 = off
    sapo_tau_pos: float = 1.0        # sapo: gate temperature for A > 0
    sapo_tau_neg: float = 1.05       # sapo: gate temperature for A ≤ 0
    vespo_k_pos: float = 2.0         # vespo: φ(w) = e^λ w^k e^(−λw), (k, λ) for A ≥ 0 …
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0         # … and for A < 0
    vespo_lambda_neg: float = 2.0
    cov_share: float = 0.0002        # clip_cov / kl_cov: share of the batch's tokens they touch
    clip_cov_low: float = 1.0        # clip_cov: covariance window (low, high) of the tokens it may cut
    clip_cov_high: float = 5.0
    kl_cov_coef: float = 1.0         # kl_cov: weight of |log ρ| on the selected tokens
    top_entropy_quantile: float = 1.0  # train on the top-q share of tokens by entropy (0.2 in the paper); 1 = all
    rollout_correction: str = (
        "none"  # sampler ≠ trainer: none | token_truncate | token_mask | sequence_truncate | sequence_mask
    )
    rollout_is_low: float = 0.0      # rollout correction bounds on ρ = π_trainer/π_sampler: truncate to / mask outside
    rollout_is_high: float = 3.0     # [low, high] (TRL's default C_max = 3)
    dynamic_sampling: bool = False   # DAPO: drop groups with equal rewards, refill from new prompts
    max_sampling_tries: int = 4  # dynamic sampling: rollouts per step at most
    dynamic_sampling_metric: str = (
        "accuracy"  # what a kept group must have a spread in: a component, or "reward" (the total)
    )
    overlong: str = "none"           # truncated completions: none | mask (no loss) | soft (DAPO's length penalty)
    overlong_cache: int = 16         # soft: the penalty ramps 0 → −1 over the last this-many tokens
    ref_refresh_every: int = 0       # β > 0: copy the policy into the reference every N steps (R1: 400); 0 = never
    max_bad_steps: int = 5           # NaN/inf losses in a row before the run stops
    disable_dropout: bool = True     # dropout off in the policy (TRL's default): on-policy ratio 1, KL 0 at step 0
    # memory: LoRA adapters (aha/infra/lora.py, needs peft) and activation recomputation
    lora_rank: int = 0               # 0 = train every weight; R > 0 = LoRA of rank R, merged into model/ on save
    lora_alpha: int = 0              # LoRA scale alpha / rank; 0 = 2 × lora_rank
    gradient_checkpointing: bool = False
    micro_batch_size: str = "auto"   # completions per forward/backward: auto (aha plan's estimate) | at most N
    micro_batch_tokens: int = 0      # micro_batch_size=auto: tokens per forward/backward; 0 = auto (aha/core/plan.py)
    rollout_batch_size: int = 0      # rows generated at once (whole groups); 0 = auto: a KV-cache + sampling budget
    # bf16 autocast of the update's forward: auto (CPUs with AMX/AVX512-BF16) | bf16 | off; the default
    # comes from $AHA_AUTOCAST when set (CI forces bf16 on CPUs without fast bf16 to test that path too)
    autocast: str = field(default_factory=lambda: os.environ.get("AHA_AUTOCAST", "auto"))
    # scale-out (aha/infra/distributed.py, aha/core/vllm_rollout.py; docs/distributed.md)
    dist_strategy: str = "ddp"
    rollout: str = (
        "torch"  # sampler: torch (aha/core/rollout.py) | vllm (colocated vLLM, needs CUDA + pip install 'aha[gpu]')
    )
    vllm_gpu_memory: float = 0.3  # rollout=vllm: share of the GPU's memory vLLM may take (weights + KV cache)
    # tools (aha/core/tools/): multi-turn rollouts; max_new_tokens then bounds the whole interaction, tool output
    # included
    tools: str = ""                  # "" = none | python (sandboxed) | py:module:function | env:module:Class
    tool_format: str = "r1"          # r1 (<tool>CODE</tool> → <output>…</output>) | chat (the model's <tool_call> JSON)
    max_turns: int = 4               # tool calls per sample at most
    tool_timeout: float = 5.0        # python tool: wall and CPU seconds per call
    tool_output_tokens: int = 64     # tokens of one tool result shown to the model at most (the rest is cut, marked)
    tool_workers: int = 4            # tool calls run at once (threads; the python tool's work is in subprocesses)
    # rewards: total = Σ weight × component
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    reward_weights: str = ""  # any component by name, e.g. "accuracy=1,format=0.1,tinyzero=1"; overrides the two above
    # besides the task's own: format_strict, format_soft, tag_count, language,
                                     # repetition, cosine, overlong (aha/tasks/rewards.py SHAPING)
    lang: str = "en"                 # the `language` component: the language the reasoning should be in (en, id, zh, …)
    # evaluation (R1 protocol: k samples at T 0.6, top-p 0.95)
    eval_problems: int = 200
    eval_k: int = 4
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_every: int = 50             # held-out eval during training; 0 = only before/after
    # records
    dump_rollouts_every: int = 10
    checkpoint_every: int = 50       # steps between checkpoints (also the last step and on SIGTERM/SIGINT); 0 = those
    keep_checkpoints: int = 2        # the newest this-many are kept
    health_window: int = 10          # steps a symptom must last before the run warns
    report_to: str = ""              # live dashboards, comma-separated: tensorboard, wandb (aha/infra/trackers.py)

    def task_options(self) -> dict:
        """The options `get_task` takes for this task: only those that apply to it."""
        options = {}
        if self.data:
            options["data"] = self.data
        if self.eval_data:
            options["eval_data"] = self.eval_data
        if self.skip_bad_rows:
            options["skip_bad_rows"] = True
        return options | self.task_config

    def loss_spec(self):
        """The loss's settings, aha/core/algos.py `LossSpec` (the config names its keys as its fields)."""
        from aha.core.algos import LossSpec
        return LossSpec(**{f.name: getattr(self, f.name) for f in fields(LossSpec)})

    def sampling_params(self, stop_token_ids: tuple[int, ...] = (), stop_strings: tuple[str, ...] = ()):
        """The rollout's sampling settings (aha/core/rollout.py `SamplingParams`), with the model's stops;
        the decode step's matmuls in bf16 where the update's autocast is on (not `off`) and the CPU has
        fast bf16 (aha/core/decode_step.py `linears`)."""
        from aha.core.sampling import SamplingParams
        from aha.infra.model import cpu_has_fast_bf16
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.top_k, tuple(stop_token_ids),
                              tuple(stop_strings), bf16=self.autocast != "off" and cpu_has_fast_bf16())

    def eval_spec(self, rows_per_pass: int = 256):
        """R1's evaluation protocol as this config sets it (aha/eval/evaluate.py `EvalSpec`); `rows_per_pass`:
        rows generated at once (the memory plan's `eval_rows`)."""
        from aha.eval.evaluate import EvalSpec
        return EvalSpec(self.eval_problems, self.eval_k, self.eval_temperature, self.eval_top_p, self.max_new_tokens,
                        self.seed, rows_per_pass=rows_per_pass)

    def component_weights(self) -> dict[str, float]:
        """Weight of each reward component by name: accuracy/format from their own keys, DAPO's
        overlong penalty 1, then `reward_weights` on top. A component not named here weighs 0."""
        return {"accuracy": self.accuracy_weight, "format": self.format_weight, "overlong": 1.0, "env": 1.0,
                **parse_reward_weights(self.reward_weights)}

    def validate(self) -> "Config":
        from aha.core.advantages import ADVANTAGES
        from aha.core.algos import AGGREGATIONS, KL_ESTIMATORS, RATIO_LEVELS, SURROGATES
        from aha.core.rollout_correction import ROLLOUT_CORRECTIONS
        for name, registry in [("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS), ("kl", KL_ESTIMATORS),
                               ("ratio_level", RATIO_LEVELS), ("surrogate", SURROGATES),
                               ("rollout_correction", ["none", *ROLLOUT_CORRECTIONS])]:
            if getattr(self, name) not in registry:
                raise AhaError(f"config: {name}={getattr(self, name)!r} is not one of {', '.join(registry)}")
        self.validate_loss()
        positive = ["steps", "prompts_per_step", "max_new_tokens", "mu", "eval_problems", "eval_k",
                    "max_sampling_tries", "max_bad_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise AhaError(f"config: {name}={getattr(self, name)} must be at least 1")
        if self.group_size < 2:
            raise AhaError(f"config: group_size={self.group_size} must be at least 2 (advantages compare samples "
                           "within a group)")
        if self.micro_batch_size != "auto" and not (self.micro_batch_size.isdigit() and int(self.micro_batch_size) > 0):
            raise AhaError(f"config: micro_batch_size={self.micro_batch_size!r} must be auto or a whole number ≥ 1")
        if self.micro_batch_tokens < 0 or self.rollout_batch_size < 0:
            raise AhaError(f"config: micro_batch_tokens={self.micro_batch_tokens} and rollout_batch_size="
                           f"{self.rollout_batch_size} must be 0 (auto) or more")
        if self.autocast not in ("auto", "bf16", "off"):
            raise AhaError(f"config: autocast={self.autocast!r} is not one of auto, bf16, off")
        from aha.core.schedule import SCHEDULES
        if self.lr_schedule not in SCHEDULES:
            raise AhaError(f"config: lr_schedule={self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise AhaError(f"config: warmup_steps={self.warmup_steps} must be 0 or more")
        if self.overlong not in OVERLONG:
            raise AhaError(f"config: overlong={self.overlong!r} is not one of {', '.join(OVERLONG)}")
        if self.overlong == "soft" and not 0 < self.overlong_cache < self.max_new_tokens:
            raise AhaError(f"config: overlong_cache={self.overlong_cache} must be between 1 and "
                           f"max_new_tokens - 1 = {self.max_new_tokens - 1} for overlong=soft")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise AhaError(f"config: lora_rank={self.lora_rank} and lora_alpha={self.lora_alpha} must be 0 or more")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise AhaError(f"config: checkpoint_every={self.checkpoint_every} must be 0 or more and "
                           f"keep_checkpoints={self.keep_checkpoints} at least 1")
        if self.ref_refresh_every < 0:
            raise AhaError(f"config: ref_refresh_every={self.ref_refresh_every} must be 0 (never) or more")
        for name, allowed in [("dist_strategy", ("ddp", "fsdp")), ("rollout", ("torch", "vllm"))]:
            if getattr(self, name) not in allowed:
                raise AhaError(f"config: {name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0 < self.vllm_gpu_memory < 1:
            raise AhaError(f"config: vllm_gpu_memory={self.vllm_gpu_memory} must be a share between 0 and 1, e.g. 0.3")
        if not (0 < self.top_p <= 1) or self.temperature < 0 or self.lr <= 0:
            raise AhaError("config: need 0 < top_p <= 1, temperature >= 0 and lr > 0")
        parse_reward_weights(self.reward_weights)
        from aha.core.tools import validate as validate_tools
        validate_tools(self)
        from aha.infra.trackers import parse_report_to
        parse_report_to(self.report_to)
        from aha.tasks.templates import read_template
        read_template(self.template)
        return self

    def validate_loss(self) -> None:
        """The ranges of the loss knobs of aha/core/algos.py and aha/core/rollout_correction.py."""
        checks = [
            (self.dual_clip == 0 or self.dual_clip > 1,
             f"dual_clip={self.dual_clip} must be 0 (off) or above 1 (verl: 3)"),
            (self.sapo_tau_pos > 0 and self.sapo_tau_neg > 0,
             f"sapo_tau_pos={self.sapo_tau_pos} and sapo_tau_neg={self.sapo_tau_neg} must be above 0"),
            (min(self.vespo_lambda_pos, self.vespo_lambda_neg) >= 0,
             "vespo_lambda_pos and vespo_lambda_neg must be 0 or more"),
            (0 < self.cov_share <= 1, f"cov_share={self.cov_share} must be a share in (0, 1], e.g. 0.0002"),
            (self.clip_cov_low < self.clip_cov_high,
             f"clip_cov_low={self.clip_cov_low} must be below clip_cov_high={self.clip_cov_high}"),
            (0 <= self.top_entropy_quantile <= 1,
             f"top_entropy_quantile={self.top_entropy_quantile} must be in [0, 1] (1 = every token)"),
            (0 <= self.rollout_is_low < self.rollout_is_high,
             f"need 0 <= rollout_is_low < rollout_is_high, got {self.rollout_is_low} and {self.rollout_is_high}"),
            (self.clip_low >= 0 and self.clip_high >= 0,
             f"clip_low={self.clip_low} and clip_high={self.clip_high} must be 0 or more"),
            (not (self.surrogate == "vespo" and self.rollout_correction.startswith("sequence")),
             f"surrogate=vespo folds token weights into its sequence ratio: use rollout_correction=token_truncate or "
             f"token_mask, not {self.rollout_correction} (as TRL)"),
        ]
        for ok, message in checks:
            if not ok:
                raise AhaError(f"config: {message}")


def parse_reward_weights(text: str) -> dict[str, float]:
    """`"accuracy=1, format=0.1,tinyzero=1"` → {"accuracy": 1.0, "format": 0.1, "tinyzero": 1.0}; "" → {}.

    >>> parse_reward_weights("accuracy=1,format=0.1")
    {'accuracy': 1.0, 'format': 0.1}
    """
    weights = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, value = (x.strip() for x in part.partition("="))
        try:
            number = float(value) if eq and name.isidentifier() else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            raise AhaError(f"config: reward_weights entry {part!r} is not name=number (e.g. \"accuracy=1,format=0.1\")")
        if name == "skip":
            raise AhaError(
                "config: reward_weights cannot weight 'skip': it marks samples to leave out, it is not a reward"
            )
        if name in weights:
            raise AhaError(f"config: reward_weights names {name!r} twice")
        weights[name] = number
    return weights


def load_config(path: str | None = None, overrides: dict | None = None, base: dict | None = None) -> Config:
    """Defaults → preset of the chosen `algo` → YAML file → overrides; then validated."""
    from aha.core.presets import PRESETS
    overrides = dict(overrides or {})
    file_values = read_yaml_mapping(path) if path else {}
    cfg = apply_values(Config(), dict(base or {}), "defaults")
    algo = overrides.get("algo", file_values.get("algo", cfg.algo))
    if algo not in PRESETS:
        raise AhaError(f"unknown algo {algo!r}: choose one of {', '.join(PRESETS)}")
    apply_values(cfg, PRESETS[algo], f"preset {algo}")
    task = overrides.get("task", file_values.get("task", cfg.task))
    apply_values(cfg, with_task_options(file_values, task), str(path))
    if path and "template" in file_values:
        cfg.template = beside(cfg.template, Path(path).parent)
    apply_values(cfg, with_task_options(overrides, task), "command line")
    return cfg.validate()


def stage_config(values: dict, steps: int, out, model="") -> Config:
    """The aha train config of an RL stage inside a larger job (the pipeline, an experiment): `values`
    on top of the defaults, no held-out evals inside the stage (the job evaluates after it)."""
    return load_config(None, {**values, "steps": steps, "out": str(out), "model": str(model)}, base={"eval_every": 0})


def yaml_value(raw):
    """A command-line value as YAML reads it ("4" → 4), or the text itself where YAML cannot."""
    try:
        return yaml.safe_load(raw) if isinstance(raw, str) else raw
    except yaml.YAMLError:
        return raw


def with_task_options(values: dict, task: str) -> dict:
    """`values` with the keys that are no Config field but options of `task` moved into its
    `task_config` (`aha train digits=4` is `task_config={digits: 4}`; config files saved before
    task_config held them read as they did)."""
    from aha.tasks import task_option_names
    names = {f.name for f in fields(Config)}
    loose = {k: yaml_value(v) for k, v in values.items() if k not in names and k in task_option_names(task)}
    if not loose:
        return values
    given = coerce("task_config", values.get("task_config") or {}, dict)
    rest = {k: v for k, v in values.items() if k not in loose}
    return rest | {"task_config": {**given, **loose}}


def beside(template: str, folder: Path) -> str:
    """A config file's relative template path, read from the file's own folder when it is there
    and not in the working directory (`recipes/x.yaml` naming `x.prompt.txt` works from anywhere)."""
    from aha.tasks.templates import NAMED
    if template in NAMED or Path(template).is_absolute() or Path(template).is_file():
        return template
    candidate = folder / template
    return str(candidate.resolve()) if candidate.is_file() else template


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
