"""Reward service: scores (prompt, response) pairs with a sequence-classification model."""
