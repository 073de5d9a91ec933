"""Downstream evaluation with EleutherAI's lm-evaluation-harness (lm-eval): an lm-eval model class
over a Neon model (harness.py), the forward pass it runs at any parallel layout (forward.py), and
running tasks from lm-eval's registry or a local folder of task YAMLs (tasks.py)."""
