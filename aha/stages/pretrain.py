"""`aha pretrain`: train the tiny base model on a synthetic corpus made by the task generator.

The corpus (see `AdditionTask.corpus_document`) mixes worked reasoning inside `<think>…</think>`
(a fraction `think_frac` of documents) with direct answers. Problems come from the task's
training stream, so no held-out evaluation problem is ever in the corpus. Plain next-token
prediction on whole documents (prompt included), AdamW, cosine decay; deterministic on CPU for
a given seed and thread count.

    aha pretrain --out aha/infra/assets/base        # rebuilds the shipped base model (~400 s, 2 cores)
"""

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aha.infra.card import CardInfo, save_model
from aha.infra.model import build_model, count_parameters
from aha.infra.progress import progress_bar
from aha.infra.tokenizer import TAGS, build_char_tokenizer
from aha.tasks import get_task


@dataclass
class PretrainConfig:
    out: str = "models/base"
    arch: str = "gpt2"
    hidden: int = 192
    layers: int = 4
    digits: int = 3
    think_frac: float = 0.3
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    seed: int = 0
    max_seconds: float = 0.0          # 0 = no time cap (a cap makes the result depend on speed)
    task: str = "addition"            # whose corpus: addition, or multiplication (the tool demo, aha/core/tools/)
    tool_frac: float = 0.2            # multiplication: share of worked answers that call the tool


def corpus_batches(task, tokenizer, think_frac: float, batch_size: int, seed: int, pool: int = 1):
    """Endless (input_ids, loss_mask) batches of right-padded documents, each ending in EOS.

    The loss mask covers the response only: the question's digits are random, and predicting
    them would add noise, not knowledge; nor tool output (`<output>…</output>`), which a tool writes,
    never the model (aha/core/tools/). Documents are drawn `pool` batches at a time and
    sorted by length, so worked and direct answers mostly fill separate batches and little
    compute goes to padding.
    """
    problems, rng = task.train_problems(seed), random.Random(seed + 1)
    while True:
        docs = []
        for _ in range(batch_size * pool):
            problem = next(problems)
            prompt_len = len(tokenizer(task.prompt(problem))["input_ids"])
            ids = tokenizer(task.corpus_document(problem, think=rng.random() < think_frac))["input_ids"]
            docs.append((ids + [tokenizer.eos_token_id], prompt_len))
        docs.sort(key=lambda d: len(d[0]))
        batches = [docs[i:i + batch_size] for i in range(0, len(docs), batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
            loss_mask = torch.zeros((batch_size, width), dtype=torch.long)
            for i, (ids, prompt_len) in enumerate(batch):
                input_ids[i, :len(ids)] = torch.tensor(ids)
                loss_mask[i, prompt_len:len(ids)] = 1
            yield input_ids, loss_mask * ~tool_output(input_ids, tokenizer)


def tool_output(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B, L) bool: the tokens from each `<output>` through its `</output>` (all False when the
    tokenizer has no such single tokens).

    >>> from aha.infra.tokenizer import TAGS, TOOL_TAGS, build_char_tokenizer
    >>> tok = build_char_tokenizer(TAGS + TOOL_TAGS)
    >>> tool_output(torch.tensor([tok("1<output>23</output>4")["input_ids"]]), tok).long().tolist()
    [[0, 1, 1, 1, 1, 0]]
    """
    ids = tokenizer.convert_tokens_to_ids(["<output>", "</output>"])
    if any(i is None or i == tokenizer.unk_token_id for i in ids) or len(set(ids)) < 2:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    opened = (input_ids == ids[0]).long().cumsum(dim=1)
    closed = (input_ids == ids[1]).long().cumsum(dim=1)
    return (opened > closed) | (input_ids == ids[1])


def lm_loss(model, input_ids, loss_mask) -> torch.Tensor:
    """Next-token cross-entropy on the positions of `loss_mask` (right padding needs no attention mask)."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]   # (B, L-1, V)
    targets = input_ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


def pretrain(cfg: PretrainConfig, console=None) -> dict:
    torch.manual_seed(cfg.seed)
    task = get_task(
        cfg.task, digits=cfg.digits, **({"tool_frac": cfg.tool_frac} if cfg.task == "multiplication" else {})
    )
    tokenizer = build_char_tokenizer(TAGS + list(getattr(task, "tokenizer_tags", ())))
    model = build_model(cfg.arch, tokenizer, cfg.seed, hidden=cfg.hidden, layers=cfg.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    batches = corpus_batches(task, tokenizer, cfg.think_frac, cfg.batch_size, cfg.seed)
    start, tokens, losses = time.time(), 0, []
    model.train()
    with progress_bar(console) as bar:
        job = bar.add_task("pretrain", total=cfg.steps)
        for step in range(cfg.steps):
            input_ids, mask = next(batches)
            loss = lm_loss(model, input_ids, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tokens += int((input_ids != tokenizer.pad_token_id).sum())
            losses.append(loss.item())
            bar.update(job, advance=1, description=f"pretrain loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if not bar.console.is_terminal and step % 100 == 0:
                bar.console.print(f"pretrain step {step}/{cfg.steps} loss {losses[-1]:.3f} {time.time() - start:.0f} s")
            if cfg.max_seconds and time.time() - start > cfg.max_seconds:
                break
    elapsed = time.time() - start
    model.eval()
    val_input, val_mask = next(corpus_batches(task, tokenizer, cfg.think_frac, 256, cfg.seed + 10_000))
    with torch.no_grad():
        val_loss = float(lm_loss(model, val_input, val_mask))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"arch": cfg.arch, "parameters": count_parameters(model), "steps": step + 1,
             "seconds": round(elapsed, 1), "tokens_per_second": round(tokens / elapsed),
             "train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), "val_loss": round(val_loss, 4),
             "think_frac": cfg.think_frac, "digits": cfg.digits, "seed": cfg.seed, "task": cfg.task,
             **({"tool_frac": cfg.tool_frac} if cfg.task == "multiplication" else {})}
    (out / "pretrain.json").write_text(__import__("json").dumps(stats, indent=2))
    hyper = {"arch": cfg.arch, "hidden": cfg.hidden, "layers": cfg.layers, "batch_size": cfg.batch_size, "lr": cfg.lr,
             "warmup": cfg.warmup, "think_frac": cfg.think_frac}
    save_model(model, tokenizer, out, CardInfo(
        "random initialisation", f"{cfg.digits}-digit {cfg.task} corpus", "pretrain", stats["steps"], cfg.seed, hyper,
        note=f"Next-token pretraining, {stats['parameters']:,} parameters: validation loss {stats['val_loss']}."))
    return stats
