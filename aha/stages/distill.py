"""`aha distill`: R1's distillation — a strong teacher's verified answers become a student's SFT data.

    aha distill --teacher runs/big/model --student models/base --task addition --prompts 512 --out models/distilled

Two stages, each its own module: rejection sampling from the teacher (aha/stages/rejection.py: only
verified, well-formed, non-repetitive answers to TRAINING problems are kept), then supervised
fine-tuning of the student on them (aha/stages/sft.py). `--out` receives the kept samples
(`samples.jsonl`), the student as a plain transformers dir, and `distill.json` (both stages' stats).
Departure from R1: no RL stage after distillation (run `aha train --model OUT` for that).
"""

import json
from dataclasses import replace
from pathlib import Path

from aha.infra.card import CardInfo, write_card
from aha.infra.errors import AhaError
from aha.stages.rejection import SampleConfig, rejection_sample
from aha.stages.sft import SFTConfig, sft


def distill(sample_cfg: SampleConfig, sft_cfg: SFTConfig, console=None) -> dict:
    """sample_cfg.model is the teacher, sft_cfg.model the student, sft_cfg.out the folder."""
    out = Path(sft_cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = out / "samples.jsonl"
    sampled = rejection_sample(replace(sample_cfg, out=str(samples)), console=console)
    if sampled["kept"] == 0:
        raise AhaError(f"distill: the teacher {sample_cfg.model} got no sample right out of {sampled['samples']}; "
                       "nothing to learn from (try more --prompts, a larger --k or a stronger teacher)")
    trained = sft(replace(sft_cfg, data=str(samples)), console=console)
    hyper = {
        "teacher": str(sample_cfg.model),
        "prompts": sample_cfg.prompts,
        "k": sample_cfg.k,
        "temperature": sample_cfg.temperature,
        "top_p": sample_cfg.top_p,
        "epochs": sft_cfg.epochs,
        "lr": sft_cfg.lr,
    }
    write_card(out, CardInfo(str(sft_cfg.model), sample_cfg.task, "distill", trained["steps"], sft_cfg.seed, hyper,
                             note=f"Distilled from `{sample_cfg.model}`: SFT on its {sampled['kept']} verified samples "
                                  f"of {sampled['samples']}."))
    stats = {"teacher": str(sample_cfg.model), "student": str(sft_cfg.model), "sample": sampled, "sft": trained}
    (out / "distill.json").write_text(json.dumps(stats, indent=2))
    return stats
