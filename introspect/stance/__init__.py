"""Epistemic stance: how responses express it, and how training the stance changes a model."""
