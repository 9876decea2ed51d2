"""The built-in base model: shipped in `aha/infra/assets/base` (rebuilt by `aha pretrain`, see README),
or, if that folder is missing, pretrained once on the fly and cached in `$AHA_CACHE`
(default `~/.cache/aha`)."""

import os
from pathlib import Path

SHIPPED = Path(__file__).parent / "assets" / "base"


def cache_dir() -> Path:
    return Path(os.environ.get("AHA_CACHE", Path.home() / ".cache" / "aha"))


def ensure_base_model(console=None) -> Path:
    if (SHIPPED / "config.json").is_file():
        return SHIPPED
    cached = cache_dir() / "base"
    if not (cached / "config.json").is_file():
        from aha.stages.pretrain import PretrainConfig, pretrain
        pretrain(PretrainConfig(out=str(cached)), console=console)
    return cached
