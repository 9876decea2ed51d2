"""The RL core: one GRPO step and its parts.

train.py is the loop (rollout → reward → advantage → loss → update → log); rollout.py samples the
completions (KV cache, shared prefill); logprobs.py the policy's log-probabilities of them; algos.py
the equations (advantages, surrogates, KL, aggregation) chosen by name; dynamic.py DAPO's dynamic
sampling; rollout_correction.py TIS/MIS; health.py the run's warnings; schedule.py the learning
rate; presets.py the named recipes; tools/ multi-turn rollouts with tool calls.
"""
