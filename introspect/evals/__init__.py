"""Evaluation suites (B1-B7)."""
