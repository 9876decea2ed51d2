"""`aha plan`: will this run fit, and how long will a step take? Answered before anything runs.

    aha plan --model DIR --task gsm8k --data train.jsonl group_size=16 max_new_tokens=512

Takes the config and flags of `aha train`, builds nothing big (the model is sized on torch's meta
device), and prints the predicted peak memory of the run broken down into its parts:

- static, held all run long: the process itself (Python, torch, transformers: measured, this process
  has imported the same), the weights, their gradients, AdamW's two moments, the reference model
  (β > 0 only);
- per phase, the largest of: the update (activations and logits of one micro-batch), the rollout
  (KV cache and the per-step sampling buffers of one pass of rows), evaluation (the same, for the
  eval rows), writing a checkpoint (safetensors serialises a copy of the weights), and AdamW's
  step (its multi-tensor kernels make temporaries the size of two copies of the trained weights).

Activation bytes per token and layer are the tensors autograd keeps: 10·H + 4·I + 2·KV values
per token and layer (H hidden, I MLP width, KV the key/value width), counted with
`torch.autograd.graph.saved_tensors_hooks` on transformers' GPT-2 and Llama blocks (within 5%:
tests/test_plan.py), plus 3·heads·S (S the sequence length) for the attention probabilities of an
eager/math attention, which a masked batch may fall back to — then the logits, full or in chunks
(aha/core/logprobs.py). Checked against measured peak RSS on three configurations (README, "Will it
fit"); expect ±25%.

The same estimate picks `micro_batch_tokens` and `rollout_batch_size` when they are auto, and
`aha train` refuses, in one line and before it creates a run folder, a run in which even one row per
micro-batch does not fit. The time per step comes from a calibration of about a second: one decode
step and one forward/backward of the real model (random weights) on this machine, scaled to the run.
"""

from dataclasses import asdict, dataclass

import torch

from aha.core.logprobs import CHUNK_LOGIT_BYTES, KEEP_PROBS_BYTES, LOGIT_BYTES
from aha.infra.config import Config
from aha.infra.errors import AhaError

AUTO_MAX_TOKENS = 8192               # micro_batch_tokens=auto on a CPU: at most this many tokens per forward/backward
AUTO_UPDATE_BYTES = 2 * 2**30        # … and at most this much activation + logit memory (bigger buys a CPU nothing)
GPU_AUTO_MAX_TOKENS = 65_536         # on a GPU bigger micro-batches run faster: up to half the free memory
AUTO_ROLLOUT_BYTES = 256 * 2**20     # rollout_batch_size=auto: sampling buffers + KV cache of one pass
SAMPLING_BYTES_PER_LOGIT = 28        # per row and vocabulary entry, per decode step: fp32 logits, scaled,
                                     # filtered, softmax, log-softmax and the fp64 cumulative sum
HEADROOM = 0.9                       # plan to use at most this share of the device's free memory


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know of a transformers config."""
    params: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_width: int            # key/value features per token and layer (kv_heads × head_dim)
    intermediate: int
    max_positions: int

    @staticmethod
    def of(config, params: int) -> "ModelShape":
        get = lambda *names, default=None: next(
            (getattr(config, n) for n in names if getattr(config, n, None)), default
        )  # noqa: E731
        hidden = get("hidden_size", "n_embd")
        heads = get("num_attention_heads", "n_head")
        head_dim = get("head_dim", default=hidden // heads)
        kv_heads = get("num_key_value_heads", default=heads)
        if getattr(config, "kv_lora_rank", None):        # MLA (DeepSeek-V3) caches keys and values per head
            head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
            head_dim //= 2
        return ModelShape(
            params=params,
            vocab=config.vocab_size,
            hidden=hidden,
            layers=get("num_hidden_layers", "n_layer"),
            heads=heads,
            kv_width=kv_heads * head_dim,
            intermediate=get("intermediate_size", "n_inner", default=4 * hidden),
            max_positions=get("max_position_embeddings", "n_positions", default=0),
        )


def count_parameters_of(config) -> int:
    """Parameters of the model a config describes, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def activation_bytes_per_token(shape: ModelShape, sequence: int, value_bytes: int, checkpointing: bool = False) -> int:
    """Bytes autograd keeps per token for the backward pass, all layers (see the module docstring).
    With gradient checkpointing each layer keeps only its input, and one layer's activations exist at
    a time, while it is recomputed in the backward pass."""
    per_layer = 10 * shape.hidden + 4 * shape.intermediate + 2 * shape.kv_width + 3 * shape.heads * sequence
    kept_layers = (
        value_bytes * (shape.hidden * shape.layers + per_layer)
        if checkpointing
        else value_bytes * per_layer * shape.layers
    )
    return kept_layers + 4 * shape.hidden * 2                                    # + embeddings and final norm


def logit_bytes(shape: ModelShape, rows: int, completion: int) -> int:
    """Logit memory of one micro-batch's forward/backward: full (R, T, V) fp32 logits in three copies
    (logits, their temperature-scaled copy, their gradient), or one chunk's in four when chunked,
    plus the probabilities the fused head keeps for backward when they fit KEEP_PROBS_BYTES."""
    full = 4 * rows * completion * shape.vocab
    if full > LOGIT_BYTES:
        return 4 * CHUNK_LOGIT_BYTES + (full if full <= KEEP_PROBS_BYTES else 0)
    return 3 * full


def update_bytes(shape: ModelShape, rows: int, prompt: int, completion: int, value_bytes: int,
                 checkpointing: bool = False) -> int:
    sequence = prompt + completion
    return (rows * sequence * activation_bytes_per_token(shape, sequence, value_bytes, checkpointing)
            + logit_bytes(shape, rows, completion))


def rollout_bytes(shape: ModelShape, rows: int, prompt: int, completion: int, value_bytes: int) -> int:
    """KV cache for prompt + completion, and the per-step sampling buffers, of `rows` rows."""
    kv = rows * (prompt + completion) * shape.layers * 2 * shape.kv_width * value_bytes
    return kv + rows * shape.vocab * SAMPLING_BYTES_PER_LOGIT


def rows_that_fit(budget: int, per_row: int, group: int, total: int) -> int:
    """Most rows (whole groups, at least one group, at most `total`) whose `per_row` bytes fit `budget`."""
    groups = max(1, budget // max(per_row * group, 1))
    return min(total, groups * group)


def rollout_rows_for(model, prompt_tokens: int, max_new_tokens: int, group: int, total: int) -> int:
    """Rows to generate at once for a loaded `model` (aha eval, aha sample): AUTO_ROLLOUT_BYTES of KV
    cache and sampling buffers, whole groups."""
    shape = ModelShape.of(model.config, sum(p.numel() for p in model.parameters()))
    weight_bytes = next(model.parameters()).element_size()
    return rows_that_fit(
        AUTO_ROLLOUT_BYTES, rollout_bytes(shape, 1, prompt_tokens, max_new_tokens, weight_bytes), group, total
    )


@dataclass
class MemoryPlan:
    process: int
    weights: int
    gradients: int
    optimizer: int
    reference: int
    update: int              # one micro-batch of `micro_batch_rows` rows
    rollout: int             # one pass of `rollout_rows` rows
    evaluation: int          # one pass of `eval_rows` rows
    checkpoint: int
    optimizer_step: int      # AdamW's foreach step: temporaries the size of two trained weights
    micro_batch_tokens: int
    micro_batch_rows: int
    rollout_rows: int
    eval_rows: int
    device_bytes: int
    largest_micro_batch: int  # rows per micro-batch that still fit the device (0: not even one)

    @property
    def static(self) -> int:
        return self.process + self.weights + self.gradients + self.optimizer + self.reference

    @property
    def peak(self) -> int:
        return self.static + max(self.update, self.rollout, self.evaluation, self.checkpoint, self.optimizer_step)

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "static": self.static, "peak": self.peak, "fits": self.fits}


def memory_plan(cfg: Config, shape: ModelShape, prompt_tokens: int, *, trainable: int | None = None,
                weight_bytes: int = 4, process_bytes: int = 0, device_bytes: int = 1 << 62, world_size: int = 1,
                gpu: bool = False) -> MemoryPlan:
    """The predicted memory of `cfg` on a model of `shape` whose longest prompt has `prompt_tokens`
    tokens. `trainable`: parameters that train (LoRA: the adapters; default all). FSDP shards the
    gradients and optimizer state over `world_size` processes. Pure arithmetic (tests/test_plan.py)."""
    trainable = shape.params if trainable is None else trainable
    shards = world_size if cfg.dist_strategy == "fsdp" else 1
    value_bytes = 2 if (cfg.autocast == "bf16" or weight_bytes == 2) else 4
    completion, rows_total = cfg.max_new_tokens, cfg.prompts_per_step * cfg.group_size
    sequence = prompt_tokens + completion
    weights = shape.params * weight_bytes
    gradients = trainable * weight_bytes // shards
    optimizer = 2 * trainable * weight_bytes // shards
    reference = weights if cfg.beta > 0 else 0
    static = process_bytes + weights + gradients + optimizer + reference
    free = max(0, int(HEADROOM * device_bytes) - static)

    checkpointing = cfg.gradient_checkpointing
    per_token = activation_bytes_per_token(shape, sequence, value_bytes, checkpointing)
    if cfg.micro_batch_size != "auto":
        rows = int(cfg.micro_batch_size)
        tokens = rows * sequence
    else:
        cap_tokens, cap_bytes = (
            (GPU_AUTO_MAX_TOKENS, free // 2) if gpu else (AUTO_MAX_TOKENS, min(AUTO_UPDATE_BYTES, free // 2))
        )
        tokens = cfg.micro_batch_tokens or min(cap_tokens, max(sequence, cap_bytes // per_token))
        rows = max(1, tokens // sequence)
    rows = min(rows, rows_total)
    update = update_bytes(shape, rows, prompt_tokens, completion, value_bytes, checkpointing)

    per_rollout_row = rollout_bytes(shape, 1, prompt_tokens, completion, weight_bytes)
    rollout_budget = (
        max(AUTO_ROLLOUT_BYTES, free // 4) if gpu else AUTO_ROLLOUT_BYTES
    )  # a GPU decodes wide batches fast
    # a training step's rows in one pass where they fit in an eighth of the free memory: decoding is
    # bound by reading the weights once per step, so 3 passes of 24 rows cost ~3× one pass of 64
    # (SmolLM2-135M, 64 rows × 128 tokens in `aha bench --model`: 53.8 s in 3 passes of 24, 35.2 s in one)
    step_budget = rollout_budget if gpu else max(AUTO_ROLLOUT_BYTES, free // 8)
    rollout_rows = cfg.rollout_batch_size or rows_that_fit(step_budget, per_rollout_row, cfg.group_size, rows_total)
    rollout = rollout_bytes(shape, rollout_rows, prompt_tokens, completion, weight_bytes)
    eval_total = cfg.eval_problems * cfg.eval_k
    eval_rows = cfg.rollout_batch_size or rows_that_fit(rollout_budget, per_rollout_row, cfg.eval_k, eval_total)
    evaluation = rollout_bytes(shape, eval_rows, prompt_tokens, completion, weight_bytes)

    one_row = update_bytes(shape, 1, prompt_tokens, completion, value_bytes, checkpointing)
    largest = 0
    if one_row <= free:
        low, high = 1, rows_total                  # the update grows with rows: bisect the largest that fits
        while low < high:
            middle = (low + high + 1) // 2
            fits = update_bytes(shape, middle, prompt_tokens, completion, value_bytes, checkpointing) <= free
            low, high = (middle, high) if fits else (low, middle - 1)
        largest = low
    return MemoryPlan(process=process_bytes, weights=weights, gradients=gradients, optimizer=optimizer,
                      reference=reference, update=update, rollout=rollout, evaluation=evaluation, checkpoint=weights,
                      optimizer_step=2 * trainable * weight_bytes // shards,
                      micro_batch_tokens=rows * sequence if cfg.micro_batch_size != "auto" else tokens,
                      micro_batch_rows=rows, rollout_rows=rollout_rows, eval_rows=eval_rows,
                      device_bytes=device_bytes, largest_micro_batch=largest)


# ---- facts of this machine and this run -------------------------------------------------------


def process_rss() -> int:
    """This process's resident memory now, in bytes (Linux /proc; 0 elsewhere)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def device_memory(device: str) -> int:
    """Bytes this run may use: free GPU memory on CUDA, else the memory the OS reports available
    (MemAvailable) plus what this process already holds."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 + process_rss()
    except OSError:
        pass
    return 1 << 62


def longest_prompt(task, tokenizer, cfg: Config, sample: int = 64) -> int:
    """Tokens of the longest of `sample` training prompts (and of the eval prompts when the run
    evaluates), as the run encodes them. A prompt the tokenizer cannot spell is left out here: the
    run itself stops on it, in one line, when it comes (aha/core/rollout.py encode_prompt)."""
    from itertools import islice

    from aha.core.rollout import encode_prompt
    problems = list(islice(task.train_problems(cfg.seed), sample))
    if cfg.eval_every:
        problems += list(task.eval_problems(min(sample, cfg.eval_problems)))
    special, lengths = task.adds_special_tokens, [0]
    for problem in problems:
        try:
            lengths.append(len(encode_prompt(tokenizer, task.prompt(problem), special)))
        except AhaError:
            pass
    return max(lengths)


def plan_for(cfg: Config, model_config, task, tokenizer, *, trainable: int | None = None, params: int | None = None,
             device: str = "cpu", world_size: int = 1, process_bytes: int | None = None,
             device_bytes: int | None = None) -> tuple[MemoryPlan, int]:
    """(the memory plan of this run on this machine, the longest prompt in tokens). `process_bytes`:
    the process without the model (default: this process now, which has not loaded it)."""
    params = params or count_parameters_of(model_config)
    shape = ModelShape.of(model_config, params)
    prompt = longest_prompt(task, tokenizer, cfg)
    weight_bytes = 2 if device == "cuda" and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()) else 4
    process = process_rss() if process_bytes is None else process_bytes
    plan = memory_plan(
        cfg,
        shape,
        prompt,
        trainable=trainable,
        weight_bytes=weight_bytes,
        process_bytes=process,
        gpu=device == "cuda",
        device_bytes=device_memory(device) if device_bytes is None else device_bytes,
        world_size=world_size,
    )
    return plan, prompt


def check_fits(plan: MemoryPlan, cfg: Config) -> None:
    """One line and exit code 2 when not even one row per micro-batch fits."""
    if plan.largest_micro_batch == 0:
        gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
        raise AhaError(f"this run does not fit: the weights, gradients and optimizer state take {gib(plan.static)} and "
                       f"one row of {cfg.max_new_tokens} new tokens needs {gib(plan.update)} more for its update, but "
                       f"only {gib(plan.device_bytes)} is available: lower max_new_tokens, use lora_rank=16 or "
                       f"gradient_checkpointing, or a bigger machine (see `aha plan`)")
