"""Trainer: consumes rollouts, scores them, updates the policy, publishes weights."""
