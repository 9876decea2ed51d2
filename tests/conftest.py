import pytest
import torch

from aha.infra.model import build_model
from aha.infra.tokenizer import build_char_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Qwen2-style model + the char tokenizer, saved as a plain HF dir."""
    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = build_char_tokenizer()
    model = build_model("qwen2", tokenizer, seed=0, hidden=64, layers=2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def memorise():
    """A factory: `memorise(docs, steps)` → (model, char tokenizer), a 2-layer model trained with AdamW
    (lr 1e-2, left padding as at inference) until it answers each (user, answer) of `docs` greedily."""
    def train(docs: list[tuple[str, str]], steps: int):
        tokenizer = build_char_tokenizer()
        model = build_model("qwen2", tokenizer, seed=0, hidden=64, layers=2)
        prompt = lambda user: tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        batch = tokenizer([prompt(user) + answer + tokenizer.eos_token for user, answer in docs], return_tensors="pt",
                          padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        positions = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(0)
        for _ in range(steps):
            loss = model(**batch, position_ids=positions, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model, tokenizer
    return train
