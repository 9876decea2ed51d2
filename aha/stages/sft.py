"""`aha sft`: supervised fine-tuning on (prompt, response) pairs — R1's cold start and the
student half of distillation (aha/stages/distill.py).

    aha sft --model models/base --data kept.jsonl --out models/sft --epochs 2

Data: JSONL rows `{"prompt": …, "response": …}`; the response holds the whole answer, reasoning
included (e.g. `<think>…</think> <answer>…</answer>`). The loss is next-token cross-entropy on
the response tokens (and the EOS that ends it) only: the prompts are given, not learnt.

Sequence packing: examples, in a seeded random order, are packed greedily into rows of
`seq_len` tokens, several per row, so that little compute goes to padding. Each row carries
  - position_ids that restart at 0 for every example, so an example sees the positions it would
    see alone (and at generation time);
  - a block-diagonal causal 4D attention mask (B, 1, L, L), additive (0 = attend, dtype-min =
    blocked), so no example attends to an earlier one in its row. transformers passes a 4D mask
    through unchanged, to the eager and SDPA kernels alike.
The packed forward pass therefore equals each example's own forward pass (tested). An example
longer than `seq_len` is cut to `seq_len` tokens. A step takes rows until it holds about
`batch_tokens` tokens. AdamW, linear warmup then cosine decay; the result is a plain
transformers dir (model + tokenizer).
"""

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from aha.infra.card import CardInfo, save_model
from aha.infra.errors import AhaError
from aha.infra.progress import progress_bar


@dataclass
class SFTConfig:
    model: str = ""
    data: str = ""
    out: str = "models/sft"
    epochs: int = 1
    lr: float = 1e-4
    batch_tokens: int = 4096          # tokens per optimizer step (rows × seq_len)
    seq_len: int = 512                # packed row length
    warmup: int = 10
    seed: int = 0


@dataclass
class Packed:
    """R packed rows of L tokens."""
    input_ids: torch.Tensor           # (R, L) pad_id after the last example
    loss_mask: torch.Tensor           # (R, L) 1 on response tokens (targets)
    position_ids: torch.Tensor        # (R, L) restart at 0 for each example
    example_ids: torch.Tensor         # (R, L) which example of the row a token is from; -1 on padding


def read_examples(path: str | Path) -> list[dict]:
    """The `prompt`/`response` rows of a JSONL file; a bad row is an AhaError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise AhaError(f"data file {path} does not exist: pass a JSONL file of {{\"prompt\", \"response\"}} rows")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AhaError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("prompt"), str)
            or not isinstance(row.get("response"), str)
        ):
            raise AhaError(f"{path}:{number}: a row needs string fields \"prompt\" and \"response\"")
        if not row["response"].strip():
            raise AhaError(f"{path}:{number}: empty \"response\": there is nothing to learn from it")
        rows.append(row)
    if not rows:
        raise AhaError(f"{path} holds no rows")
    return rows


def tokenize_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(ids, loss mask): prompt tokens (mask 0), then response tokens and EOS (mask 1).
    Prompt and response are tokenized apart so the boundary is exact, as at generation time."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Packed:
    """Pack (ids, mask) examples in order into rows of seq_len tokens (a new row when the next does not fit)."""
    rows, current = [], []
    for ids, mask in examples:
        ids, mask = ids[:seq_len], mask[:seq_len]
        if current and sum(len(i) for i, _ in current) + len(ids) > seq_len:
            rows.append(current)
            current = []
        current.append((ids, mask))
    if current:
        rows.append(current)
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    position_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
    example_ids = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e, (ids, mask) in enumerate(row):
            span = slice(at, at + len(ids))
            input_ids[r, span], loss_mask[r, span] = torch.tensor(ids), torch.tensor(mask)
            position_ids[r, span], example_ids[r, span] = torch.arange(len(ids)), e
            at += len(ids)
    return Packed(input_ids, loss_mask, position_ids, example_ids)


def block_causal_mask(example_ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(R, L) example ids → (R, 1, L, L) additive mask: a token attends to earlier tokens of its own
    example (padding, id −1, attends to earlier padding: harmless, it is never a target)."""
    length = example_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=example_ids.device).tril()
    same = example_ids[:, :, None] == example_ids[:, None, :]                 # (R, L, L)
    allowed = (same & causal)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=example_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def packed_loss(model, batch: Packed) -> torch.Tensor:
    """Mean next-token cross-entropy over response targets; never across two examples."""
    mask = block_causal_mask(batch.example_ids, next(model.parameters()).dtype)
    logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                   use_cache=False).logits[:, :-1]                               # (R, L-1, V)
    same_example = batch.example_ids[:, 1:] == batch.example_ids[:, :-1]
    keep = (batch.loss_mask[:, 1:] == 1) & same_example
    targets = batch.input_ids[:, 1:].masked_fill(~keep, -100)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )


def sft_model(model, tokenizer, rows: list[dict], cfg: SFTConfig, console=None) -> dict:
    """Fine-tune `model` in place on `rows`; returns {'steps', 'loss_first', 'loss_last'}."""
    device = next(model.parameters()).device
    examples = [tokenize_example(tokenizer, r["prompt"], r["response"]) for r in rows]
    rows_per_step = max(1, cfg.batch_tokens // cfg.seq_len)
    rng = random.Random(cfg.seed)
    epochs = []
    for _ in range(cfg.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        epochs.append(pack([examples[i] for i in order], cfg.seq_len, tokenizer.pad_token_id))
    total = sum(math.ceil(len(p.input_ids) / rows_per_step) for p in epochs)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, min(cfg.warmup, total // 10))      # a short run must not spend itself warming up
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses = []
    model.train()
    with progress_bar(console) as bar:
        job = bar.add_task("sft", total=total)
        for packed in epochs:
            for start in range(0, len(packed.input_ids), rows_per_step):
                part = slice(start, start + rows_per_step)
                batch = Packed(
                    *(
                        t[part].to(device)
                        for t in (packed.input_ids, packed.loss_mask, packed.position_ids, packed.example_ids)
                    )
                )
                loss = packed_loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(job, advance=1, description=f"sft loss {losses[-1]:.3f}")
    model.eval()
    return {"steps": len(losses), "examples": len(examples), "loss_first": losses[0], "loss_last": losses[-1]}


def sft(cfg: SFTConfig, console=None) -> dict:
    from aha.infra.model import detect_device, load_model
    if cfg.epochs < 1 or cfg.seq_len < 2 or cfg.lr <= 0:
        raise AhaError("sft: --epochs ≥ 1, --seq-len ≥ 2 and --lr > 0 please")
    rows = read_examples(cfg.data)
    model, tokenizer = load_model(cfg.model, detect_device())
    stats = sft_model(model, tokenizer, rows, cfg, console=console)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    hyper = {
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "batch_tokens": cfg.batch_tokens,
        "seq_len": cfg.seq_len,
        "warmup": cfg.warmup,
    }
    save_model(
        model,
        tokenizer,
        out,
        CardInfo(
            cfg.model,
            f"SFT data {Path(cfg.data).name}",
            "sft",
            stats["steps"],
            cfg.seed,
            hyper,
            note=f"Supervised fine-tuning on {stats['examples']} examples of `{cfg.data}`: loss "
                 f"{stats['loss_first']:.3f} → "
            f"{stats['loss_last']:.3f}.",
        ),
    )
    (out / "sft.json").write_text(json.dumps({**stats, "data": str(cfg.data), "base_model": str(cfg.model)}, indent=2))
    return stats
