import pytest
import torch

from aha.model import build_model
from aha.tokenizer import build_char_tokenizer


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
