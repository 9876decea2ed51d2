"""Evaluation with R1's protocol: evaluate.py samples k completions per held-out problem and scores
them; passk.py the unbiased pass@k and cons@k estimators; cli.py `aha eval`."""
