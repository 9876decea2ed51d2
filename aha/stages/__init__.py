"""The stages of the R1 recipe around the RL core.

pretrain.py builds a base model from a task's corpus; sft.py the cold start; rejection.py rejection
sampling (keep the completions the reward accepts); distill.py a teacher's samples into a student;
pipeline.py chains SFT → RL → rejection sampling → SFT → RL; experiment.py, findings.py and
findings_report.py the papers' findings as runnable experiments; run.py `aha run`, the default demo;
cli.py the commands of these stages.
"""
