"""LoRA (Hu et al. 2021) through peft, for `aha train lora_rank=R`: only low-rank adapters train.

The training loop keeps calling the plain transformers model: peft injects its LoRA layers into
that model's modules in place, so forward signatures (KV cache, `logits_to_keep`) are unchanged.
On save the adapters are merged into the weights (`merge_and_unload`), so `OUT/model` is a plain
transformers dir that `AutoModelForCausalLM.from_pretrained` loads — no peft needed to use it.

    pip install 'aha[lora]'
    aha train --model DIR lora_rank=16 lora_alpha=32
"""

from aha.infra.errors import AhaError

# Attention and MLP projections by architecture; anything else: every linear layer but the head.
ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"llama": ATTENTION_MLP, "qwen2": ATTENTION_MLP, "qwen3": ATTENTION_MLP, "mistral": ATTENTION_MLP,
           "gpt2": ["c_attn", "c_proj", "c_fc"]}


def target_modules(model_type: str) -> list[str] | str:
    """Module names LoRA adapts for this `config.model_type`; peft's "all-linear" otherwise."""
    return TARGETS.get(model_type, "all-linear")


def add_lora(model, rank: int, alpha: int):
    """(peft model, the transformers model with LoRA layers inside it). Freezes all else."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise AhaError("lora_rank > 0 needs peft: pip install 'aha[lora]' (or pip install peft)") from None
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, bias="none",
                        target_modules=target_modules(model.config.model_type), task_type="CAUSAL_LM",
                        fan_in_fan_out=model.config.model_type == "gpt2")    # GPT-2's Conv1D stores W transposed
    peft_model = get_peft_model(model, config)
    return peft_model, peft_model.get_base_model()


def merged(peft_model, copy: bool = False):
    """The plain transformers model with the adapters folded into its weights. In place (the
    adapters are gone afterwards) unless `copy`, which merges a deep copy and leaves training as it was."""
    if copy:
        import copy as copying
        peft_model = copying.deepcopy(peft_model)
    return peft_model.merge_and_unload()
