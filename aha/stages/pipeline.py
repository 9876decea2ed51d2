"""`aha pipeline`: DeepSeek-R1's four stages from one config, at toy scale.

    aha pipeline --quick --out runs/pipe                     # ~5-8 min on 2 CPU cores
    aha pipeline --config recipes/pipeline_quick.yaml --out runs/pipe rl_steps=100

  (1) cold start: SFT of the base model on a few worked long-CoT answers to TRAINING problems
      (the built-in task writes its own scratchpads, `corpus_document(think=True)`; any other
      task takes a JSONL file of `prompt`/`response` rows, `cold_start_data`);
  (2) reasoning RL (aha.core.train) from the cold-started model;
  (3) rejection sampling (aha.stages.rejection) from the stage-2 model, then SFT of the BASE model on the
      kept samples, plus the cold-start data (`with_cold_start`), as R1 did;
  (4) final RL (aha.core.train) from the stage-3 model.
pass@1 on the task's held-out problems (R1 protocol: k samples, T 0.6, top-p 0.95) of the base
model and after every stage goes to DIR/pipeline.json (the record) and DIR/pipeline.md (R1's
table). Each stage writes into its own folder DIR/N_name/ (its data, `model/`, `eval.json`).

Departures from R1: the rejection-sampled data holds reasoning samples only (no "general" data);
the final RL uses the same rule rewards as stage 2 (no preference reward model); `language`
is R1's readability filter on the stage-3 samples. R1's language-consistency *reward* is an
`aha train` component: `rl: {reward_weights: "accuracy=1,format=0.1,language=0.1", lang: en}`
(the built-in task's scratchpad has no words to classify, so it is off by default).
"""

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aha.infra.config import Config, stage_config
from aha.infra.errors import AhaError
from aha.infra.reader import apply_values, read_yaml_mapping

STAGES = [("base", "base"), ("cold_start", "cold start (≈ R1-Dev1)"), ("reasoning_rl", "reasoning RL (≈ R1-Dev2)"),
          ("rejection_sft", "rejection-SFT (≈ R1-Dev3)"), ("final_rl", "final RL (≈ R1)")]
COLD_START_STREAM = 7_777        # cold-start problems come from another training stream than RL's
OWNED_BY_PIPELINE = {"task", "task_config", "data", "seed", "max_new_tokens", "eval_problems", "eval_k", "steps",
                     "model", "out"}


@dataclass
class PipelineConfig:
    out: str = "runs/pipeline"
    model: str = ""                  # base model dir; "" = the built-in base model
    task: str = "addition"
    task_config: dict = field(default_factory=dict)   # the task's own options, e.g. {digits: 4} for addition
    data: str = ""                   # file-backed tasks
    seed: int = 0
    max_new_tokens: int = 64         # every generation: RL, sampling, eval
    # (1) cold start
    cold_start_examples: int = 64
    cold_start_data: str = ""        # JSONL prompt/response; "" = the task's own worked solutions
    cold_start_epochs: int = 8       # a few examples, seen often enough that the model always reasons
    # (1) and (3) SFT
    sft_epochs: int = 2              # (3): R1's 2 epochs on the rejection-sampled data
    sft_lr: float = 3e-4             # 1e-3 already costs the tiny model accuracy, 3e-3 ruins it
    sft_batch_tokens: int = 512
    sft_seq_len: int = 256
    # (2) and (4) RL; `rl` holds any other aha train key (aha/infra/config.py) for both, e.g. {algo: dapo, lr: 5e-5}
    rl_steps: int = 150
    final_rl_steps: int = 100
    rl: dict = field(default_factory=dict, metadata={"keys_of": Config})
    # (3) rejection sampling
    sample_prompts: int = 256
    sample_k: int = 4
    language: str = ""               # e.g. "en": keep only samples whose reasoning is in this language
    with_cold_start: bool = True     # stage-3 SFT data also holds the cold-start examples
    # evaluation (R1 protocol)
    eval_problems: int = 200
    eval_k: int = 4

    def validate(self) -> "PipelineConfig":
        for name in (
            "max_new_tokens",
            "cold_start_examples",
            "cold_start_epochs",
            "sft_epochs",
            "sft_batch_tokens",
            "rl_steps",
            "final_rl_steps",
            "sample_prompts",
            "sample_k",
            "eval_problems",
            "eval_k",
        ):
            if getattr(self, name) < 1:
                raise AhaError(f"pipeline config: {name}={getattr(self, name)} must be at least 1")
        if self.sft_lr <= 0 or self.sft_seq_len < 2:
            raise AhaError("pipeline config: need sft_lr > 0 and sft_seq_len >= 2")
        for name in ("model", "cold_start_data"):
            if getattr(self, name) and not Path(getattr(self, name)).exists():
                raise AhaError(f"pipeline config: {name}={getattr(self, name)!r} does not exist")
        owned = set(self.rl) & OWNED_BY_PIPELINE
        if owned:
            raise AhaError(f"pipeline config: rl: sets {', '.join(sorted(owned))}; set it at the top level of the "
                           "pipeline config (steps: rl_steps / final_rl_steps)")
        self.rl_config(self.rl_steps, self.out)        # an unknown or ill-typed rl key fails now, not at stage 2
        return self

    def rl_config(self, steps: int, out: str, model: str = "") -> Config:
        """The aha train config of an RL stage: no evals inside the stage (the pipeline evaluates
        after it), the pipeline's task/seed/sizes, then the `rl` keys."""
        owned = {"task": self.task, "task_config": self.task_config, "data": self.data, "seed": self.seed,
                 "max_new_tokens": self.max_new_tokens, "eval_problems": self.eval_problems, "eval_k": self.eval_k}
        return stage_config({**self.rl, **owned}, steps, out, model)


# --quick: the four stages in ~5-8 minutes on 2 CPU cores (recipes/pipeline_quick.yaml writes it out)
QUICK = {"cold_start_examples": 64, "cold_start_epochs": 8, "sft_epochs": 2, "rl_steps": 50, "final_rl_steps": 40,
         "sample_prompts": 128, "sample_k": 2, "eval_problems": 100, "eval_k": 2}


def load_pipeline_config(path: str | None = None, overrides: dict | None = None, quick: bool = False) -> PipelineConfig:
    """Defaults → QUICK (with `quick`) → YAML file → overrides; then validated."""
    values = read_yaml_mapping(path) if path else {}
    cfg = PipelineConfig()
    if quick:
        apply_values(cfg, QUICK, "--quick")
    apply_values(cfg, values, str(path))
    apply_values(cfg, overrides or {}, "command line")
    return cfg.validate()


def cold_start_rows(task, templated, cfg: PipelineConfig) -> list[dict]:
    """The cold-start SFT data: rows of `cold_start_data`, or worked solutions the task writes itself."""
    from aha.stages.sft import read_examples
    if cfg.cold_start_data:
        return read_examples(cfg.cold_start_data)[:cfg.cold_start_examples]
    if not task.writes_corpus:
        raise AhaError(f"pipeline: task {cfg.task!r} cannot write worked solutions; give cold_start_data: a JSONL "
                       "file of {\"prompt\", \"response\"} rows with long chains of thought")
    problems, rows = task.train_problems(cfg.seed + COLD_START_STREAM), []
    for _ in range(cfg.cold_start_examples):
        problem = next(problems)
        response = task.corpus_document(problem, think=True)[len(task.prompt(problem)):]
        prefill = templated.prefill(problem) if hasattr(templated, "prefill") else ""
        if prefill:                      # the prompt already ends in <think>
            response = response.strip()[len(prefill):]
        rows.append({"prompt": templated.prompt(problem), "response": response})
    return rows


def sft_stage(start_dir: Path, rows: list[dict], epochs: int, folder: Path, cfg: PipelineConfig, console=None) -> dict:
    """SFT of the model in `start_dir` on `rows` (written to folder/sft_data.jsonl) → folder/model."""
    from aha.stages.rejection import write_rows
    from aha.stages.sft import SFTConfig, sft
    write_rows(rows, folder / "sft_data.jsonl")
    return sft(SFTConfig(model=str(start_dir), data=str(folder / "sft_data.jsonl"), out=str(folder / "model"),
                         epochs=epochs, lr=cfg.sft_lr, batch_tokens=cfg.sft_batch_tokens,
                         seq_len=cfg.sft_seq_len, seed=cfg.seed), console=console)


def rl_stage(start_dir: Path, steps: int, folder: Path, cfg: PipelineConfig, console=None) -> dict:
    """aha.core.train from the model in `start_dir` → folder/{config.yaml, metrics.jsonl, rollouts.jsonl, model}."""
    from aha.core.train import train
    history = train(cfg.rl_config(steps, str(folder), str(start_dir)), console=console, out=folder)["history"]
    last = history[-max(1, len(history) // 10):]
    return {"steps": len(history), "reward_last": sum(r["reward_mean"] for r in last) / len(last),
            "pass_rate_last": sum(r["pass_rate"] for r in last) / len(last)}


def rejection_stage(
    model_dir: Path, folder: Path, cfg: PipelineConfig, rl_cfg: Config, console=None
) -> tuple[list[dict], dict]:
    """R1's rejection sampling from the stage-2 model: only verified, clean samples (aha.stages.rejection) → "
    "folder/samples.jsonl."""
    from aha.infra.model import detect_device, load_model
    from aha.stages.rejection import SampleConfig, model_completer, sample_rows, write_rows
    from aha.tasks import get_task
    from aha.tasks.templates import apply_template
    model, tokenizer = load_model(model_dir, detect_device())
    task = apply_template(get_task(cfg.task, **rl_cfg.task_options()), tokenizer, rl_cfg.template, rl_cfg.think_prefill)
    scfg = SampleConfig(model=str(model_dir), task=cfg.task, prompts=cfg.sample_prompts, k=cfg.sample_k,
                        max_new_tokens=cfg.max_new_tokens, language=cfg.language, seed=cfg.seed)
    complete = model_completer(model.eval(), tokenizer, scfg, task.adds_special_tokens)
    rows, stats = sample_rows(task, complete, scfg, str(model_dir), console)
    if not rows:
        raise AhaError(f"pipeline: the stage-2 model got no sample right out of {stats['samples']}; nothing to "
                       "fine-tune on (raise sample_prompts / sample_k or rl_steps)")
    write_rows(rows, folder / "samples.jsonl")
    return rows, stats


def run_stages(cfg: PipelineConfig, out: Path, console=None) -> list[dict]:
    """The base eval and the four stages, in order; one record per row of R1's table."""
    from aha.eval.evaluate import evaluate_dir
    from aha.infra.base import ensure_base_model
    from aha.infra.model import load_tokenizer
    from aha.tasks import get_task
    from aha.tasks.templates import apply_template
    say = (lambda line: console.print(line, soft_wrap=True, markup=False)) if console else print
    base = Path(cfg.model) if cfg.model else ensure_base_model(console)
    rl_cfg = cfg.rl_config(cfg.rl_steps, str(out))
    records = []

    def record(key: str, folder: Path, model_dir: Path, seconds: float, details: dict) -> Path:
        t0 = time.time()
        result = evaluate_dir(model_dir, rl_cfg, console, label=f"eval {key}", out=folder)
        index = len(records)
        records.append({"stage": key, "name": dict(STAGES)[key], "pass@1": result["pass@1"],
                        "think_rate": result["think_rate"], "mean_response_tokens": result["mean_response_tokens"],
                        "truncation_rate": result["truncation_rate"], "wall_seconds": round(seconds, 1),
                        "eval_seconds": round(time.time() - t0, 1), "folder": str(folder), "model": str(model_dir),
                        "details": details})
        say(
            f"pipeline: {index}/4 {dict(STAGES)[key]}: pass@1 {result['pass@1']:.3f}, think "
            f"{result['think_rate']:.2f}, "
            f"{result['mean_response_tokens']:.1f} tokens; {seconds:.0f} s (+{time.time() - t0:.0f} s eval) → {folder}"
        )
        return model_dir

    record("base", out / "0_base", base, 0.0, {})

    folder, t0 = out / "1_cold_start", time.time()
    tokenizer = load_tokenizer(base)
    task = get_task(cfg.task, **rl_cfg.task_options())
    cold = cold_start_rows(task, apply_template(task, tokenizer, rl_cfg.template, rl_cfg.think_prefill), cfg)
    stats = sft_stage(base, cold, cfg.cold_start_epochs, folder, cfg, console)
    cold_dir = record("cold_start", folder, folder / "model", time.time() - t0, {"sft": stats})

    folder, t0 = out / "2_reasoning_rl", time.time()
    folder.mkdir()
    stats = rl_stage(cold_dir, cfg.rl_steps, folder, cfg, console)
    rl_dir = record("reasoning_rl", folder, folder / "model", time.time() - t0, {"rl": stats})

    folder, t0 = out / "3_rejection_sft", time.time()
    folder.mkdir()
    kept, sampled = rejection_stage(rl_dir, folder, cfg, rl_cfg, console)
    stats = sft_stage(base, kept + (cold if cfg.with_cold_start else []), cfg.sft_epochs, folder, cfg, console)
    sft_dir = record("rejection_sft", folder, folder / "model", time.time() - t0, {"sample": sampled, "sft": stats})

    folder, t0 = out / "4_final_rl", time.time()
    folder.mkdir()
    stats = rl_stage(sft_dir, cfg.final_rl_steps, folder, cfg, console)
    record("final_rl", folder, folder / "model", time.time() - t0, {"rl": stats})
    return records


def markdown(records: list[dict], cfg: PipelineConfig) -> str:
    """R1's table at toy scale: one row per stage."""
    lines = [
        f"# R1's four stages on `{cfg.task}`",
        "",
        f"Held-out pass@1: {cfg.eval_problems} problems × {cfg.eval_k} samples, T 0.6, top-p 0.95 (R1 protocol).",
        "",
        "| stage | pass@1 | think rate | response tokens | stage wall s | folder |",
        "|---|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {r['name']} | {r['pass@1']:.3f} | {r['think_rate']:.2f} | {r['mean_response_tokens']:.1f} | "
              f"{r['wall_seconds']:.0f} | `{Path(r['folder']).name}` |" for r in records]
    return "\n".join(lines) + "\n"


def pipeline(cfg: PipelineConfig, force: bool = False, console=None) -> dict:
    from aha.infra.checkpoint import prepare_out_dir
    start = time.time()
    out = prepare_out_dir(cfg.out, force)
    (out / "pipeline.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    records = run_stages(cfg, out, console)
    report = {"task": cfg.task, "seed": cfg.seed, "eval": {"problems": cfg.eval_problems, "k": cfg.eval_k,
              "temperature": 0.6, "top_p": 0.95}, "stages": records, "wall_seconds": round(time.time() - start, 1),
              "config": dataclasses.asdict(cfg)}
    (out / "pipeline.json").write_text(json.dumps(report, indent=2))
    (out / "pipeline.md").write_text(markdown(records, cfg))
    return report


def add_pipeline_parser(sub) -> None:
    p = sub.add_parser(
        "pipeline",
        help="R1's four stages: cold-start SFT → RL → rejection-SFT → RL, with a table",
        description="Cold-start SFT of the base model, reasoning RL, rejection sampling + SFT of the base "
        "model, final RL; held-out pass@1 after every stage → --out/pipeline.json, pipeline.md.",
    )
    p.add_argument("--config", help="YAML file of pipeline keys (aha/stages/pipeline.py; recipes/pipeline_quick.yaml)")
    p.add_argument("--quick", action="store_true", help="small stages: about 5-8 minutes on 2 CPU cores")
    p.add_argument("--out", help="folder for the stages and the table")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any pipeline key, e.g. rl_steps=100")
    p.set_defaults(handler=cmd_pipeline)


def cmd_pipeline(args, console) -> None:
    from aha.infra.reader import parse_kv
    overrides = parse_kv(args.overrides)
    if args.out:
        overrides["out"] = args.out
    cfg = load_pipeline_config(args.config, overrides, quick=args.quick)
    report = pipeline(cfg, force=args.force, console=console)
    print(markdown(report["stages"], cfg), end="")
    console.print(f"{report['wall_seconds']:.0f} s; {Path(cfg.out) / 'pipeline.json'}, {Path(cfg.out) / 'pipeline.md'}")
