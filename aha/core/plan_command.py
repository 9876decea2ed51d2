"""`aha plan`'s command side: the plan of a config without a loaded model (the model sized on the
meta device), the ~1 s calibration of the time per step, and the printed table (aha/core/plan.py holds
the memory model itself)."""

import math
import time

import torch

from aha.core.plan import ModelShape, device_memory, memory_plan, plan_for, process_rss
from aha.infra.config import Config
from aha.infra.errors import AhaError


def calibrate_step_time(model, cfg: Config, prompt_tokens: int, micro_rows: int, rollout_rows: int,
                        seconds: float = 1.5) -> dict:
    """Seconds per step predicted from about `seconds` of measurement on this machine: decode steps of
    `rollout_rows` rows and forward/backward passes of a small micro-batch (after one warm-up each:
    the first call of a shape pays one-off setup), scaled to the run's tokens."""
    from aha.core.rollout import PreallocatedCache, cache_kwarg
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    rows = min(rollout_rows, cfg.prompts_per_step * cfg.group_size)
    context = min(prompt_tokens + cfg.max_new_tokens // 2, 2048)
    steps = 8
    ids = torch.randint(0, vocab, (rows, context + steps), device=device)
    kwarg = cache_kwarg(model)
    decode_times = []
    model.eval()
    with torch.no_grad():
        cache = PreallocatedCache(context + steps)
        mask = torch.ones_like(ids)
        model(input_ids=ids[:, :context], attention_mask=mask[:, :context], use_cache=True, logits_to_keep=1,
              **{kwarg: cache})
        deadline = time.perf_counter() + seconds / 2
        for step in range(steps):
            t0 = time.perf_counter()
            model(input_ids=ids[:, context + step:context + step + 1], attention_mask=mask[:, :context + step + 1],
                  use_cache=True, **{kwarg: cache})
            decode_times.append(time.perf_counter() - t0)
            if step >= 3 and time.perf_counter() > deadline:
                break
    decode = min(decode_times[1:])
    width = min(prompt_tokens + cfg.max_new_tokens, 1024)
    probe_rows = max(1, min(micro_rows, 4096 // width, 8))
    ids = torch.randint(0, vocab, (probe_rows, width), device=device)
    update_times = []
    model.train()
    deadline = time.perf_counter() + seconds / 2
    for attempt in range(4):
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        update_times.append(time.perf_counter() - t0)
        if attempt >= 1 and time.perf_counter() > deadline:
            break
    model.zero_grad(set_to_none=True)
    per_token_update = min(update_times[1:]) / (probe_rows * width)
    passes = math.ceil(cfg.prompts_per_step * cfg.group_size / rows)
    generate_s = passes * cfg.max_new_tokens * decode
    trained_tokens = cfg.prompts_per_step * cfg.group_size * (prompt_tokens + cfg.max_new_tokens)
    update_s = cfg.mu * trained_tokens * per_token_update
    return {"decode_step_s": decode, "update_s_per_token": per_token_update, "generate_s": generate_s,
            "update_s": update_s, "step_s": generate_s + update_s}


# ---- the command -------------------------------------------------------------------------------


def trainable_parameters(model_config, cfg: Config) -> tuple[int, int]:
    """(parameters, trainable parameters) of the configured model, counted on the meta device; with
    LoRA the trainable ones are the adapters peft would add."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
        params = sum(p.numel() for p in model.parameters())
        if not cfg.lora_rank:
            return params, params
        from aha.infra.lora import add_lora
        peft_model, _ = add_lora(model, cfg.lora_rank, cfg.lora_alpha)
        return params, sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def plan_command(cfg: Config, calibrate: bool = True, device: str | None = None, device_gib: float | None = None,
                 prompt_tokens: int | None = None) -> dict:
    """Everything `aha plan` prints, as a dict (also its --json). `device`, `device_gib`: plan for
    another machine (e.g. cuda with 80 GiB) than this one; `prompt_tokens`: the longest prompt, given
    instead of measured with the task's data and the model's tokenizer (neither is then needed: a dir
    with only config.json will do)."""
    from pathlib import Path

    from transformers import AutoConfig

    from aha.infra.base import ensure_base_model
    from aha.infra.model import detect_device
    model_dir = Path(cfg.model or ensure_base_model(None))
    if not (model_dir / "config.json").is_file():
        raise AhaError(f"model dir {model_dir} has no config.json: pass a transformers model directory")
    here = detect_device()
    device = device or here
    if device not in ("cpu", "cuda", "mps"):
        raise AhaError(f"--device {device!r}: choose cpu, cuda or mps")
    model_config = AutoConfig.from_pretrained(model_dir)
    params, trainable = trainable_parameters(model_config, cfg)
    device_bytes = int(device_gib * 2**30) if device_gib else (device_memory(device) if device == here else None)
    if device_bytes is None:
        raise AhaError(f"planning for {device} on a {here} machine: give its memory, e.g. --device-memory 80")
    if prompt_tokens is None:
        from aha.infra.model import load_tokenizer
        from aha.tasks import get_task
        from aha.tasks.templates import apply_template
        tokenizer = load_tokenizer(model_dir)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        task = apply_template(get_task(cfg.task, **cfg.task_options()), tokenizer, cfg.template, cfg.think_prefill)
        plan, prompt = plan_for(cfg, model_config, task, tokenizer, trainable=trainable, params=params, device=device,
                                device_bytes=device_bytes)
    else:
        prompt = prompt_tokens
        weight_bytes = 2 if device == "cuda" else 4
        plan = memory_plan(
            cfg,
            ModelShape.of(model_config, params),
            prompt,
            trainable=trainable,
            weight_bytes=weight_bytes,
            process_bytes=process_rss() if device == "cpu" else 0,
            device_bytes=device_bytes,
            gpu=device == "cuda",
        )
    result = {"model": str(model_dir), "device": device, "parameters": params, "trainable": trainable,
              "longest_prompt_tokens": prompt, **plan.as_dict()}
    if calibrate and device == here and plan.weights < plan.device_bytes // 4:
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32).to(device)
        result["time"] = calibrate_step_time(model, cfg, prompt, plan.micro_batch_rows, plan.rollout_rows)
        del model
    return result


def format_plan(result: dict) -> str:
    gib = lambda b: f"{b / 2**30:8.2f} GiB"  # noqa: E731
    lines = [f"model {result['model']} on {result['device']}: {result['parameters'] / 1e6:.1f}M parameters "
             f"({result['trainable'] / 1e6:.1f}M trained), longest prompt {result['longest_prompt_tokens']} tokens",
             "predicted peak memory:"]
    for name in ("process", "weights", "gradients", "optimizer", "reference"):
        lines.append(f"  {name:<11} {gib(result[name])}")
    lines.append(f"  {'static':<11} {gib(result['static'])}   (all run long)")
    phases = {
        "update": f"one micro-batch of {result['micro_batch_rows']} rows ({result['micro_batch_tokens']} tokens): "
        "activations + logits",
        "rollout": f"{result['rollout_rows']} rows at once: KV cache + sampling buffers",
        "evaluation": f"{result['eval_rows']} rows at once",
        "checkpoint": "serialised copy of the weights",
        "optimizer_step": "AdamW's temporaries",
    }
    for name, what in phases.items():
        lines.append(f"  {name:<11} {gib(result[name])}   {what}")
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines.append(f"  {'peak':<11} {gib(result['peak'])}   static + the largest phase; {verdict} in "
                 f"{result['device_bytes'] / 2**30:.1f} GiB ({result['device']})")
    largest = result["largest_micro_batch"]
    lines.append(f"largest micro-batch that fits: {largest} rows" if largest else
                 "not even one row per micro-batch fits: lower max_new_tokens, use LoRA or gradient checkpointing")
    if "time" in result:
        t = result["time"]
        lines.append(f"predicted time per step on this machine: {t['step_s']:.1f} s "
                     f"(generate {t['generate_s']:.1f} s, update {t['update_s']:.1f} s; from a calibration of one "
                     f"decode step and one forward/backward)")
    return "\n".join(lines)
