"""Shared training utilities for the train_*.py scripts."""
