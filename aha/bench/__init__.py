"""`aha bench`: aha against TRL on identical work. bench.py the step race on the built-in model (aha's
side is aha/core/step.py's `train_step`, the step `aha train` runs); learn.py the learning race
(held-out pass@1 against RL wall time); model.py a real model; memory.py peak memory; trl.py TRL's side,
built from its own GRPOTrainer; cli.py the command."""
