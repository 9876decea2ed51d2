"""`aha pretrain` is deterministic for a seed (so the shipped base model can be rebuilt), and the
shipped model is what its pretrain.json says."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from aha.infra.base import SHIPPED
from aha.stages.pretrain import PretrainConfig, pretrain


def test_same_seed_same_weights(tmp_path):
    weights = []
    for name in ("a", "b"):
        pretrain(PretrainConfig(out=str(tmp_path / name), steps=6, hidden=32, layers=1, batch_size=8))
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_shipped_base_matches_the_pretrain_defaults():
    stats = json.loads((SHIPPED / "pretrain.json").read_text())
    d = PretrainConfig()
    assert (stats["arch"], stats["steps"], stats["think_frac"], stats["digits"], stats["seed"]) == \
        (d.arch, d.steps, d.think_frac, d.digits, d.seed)
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["model_type"] == d.arch and config["n_embd"] == d.hidden and config["n_layer"] == d.layers
    assert Path(SHIPPED / "tokenizer.json").is_file()
