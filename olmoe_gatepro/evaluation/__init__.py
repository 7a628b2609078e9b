"""Evaluation suites (lm-eval, OLMo in-loop), result files, comparison and plots."""
