"""The RL core: one GRPO step and its parts.

train.py is the loop (config → model → task → for each step: train_step → log → evaluate →
checkpoint); step.py the step itself (rollout → reward → advantage → loss → update), which
`aha bench` times too; rollout.py samples the completions (KV cache, shared prefill) and sampling.py
draws each token; logprobs.py the policy's log-probabilities of them; advantages.py and algos.py the
equations (advantages, KL, ratios, surrogates, aggregation), chosen by name; dynamic.py DAPO's dynamic
sampling; rollout_correction.py TIS/MIS; vllm_rollout.py the vLLM sampler; tools/ multi-turn rollouts
with tool calls; health.py the run's warnings; schedule.py the learning rate; presets.py the named
recipes; plan.py and plan_command.py the memory plan (`aha plan`); cpu_linear.py oneDNN for decoding;
decode_step.py the decode step written out (GPT-2, Llama, Qwen2; each prompt's keys read once per
group, bf16 matmuls on fast-bf16 CPUs);
cli.py `aha train` and `aha plan`.
"""
