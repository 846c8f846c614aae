"""Reward learner: fine-tunes the reward model online on joined feedback labels and publishes
a new version when it passes the held-out gate."""
