"""Pure-torch RL algorithms: token log-probs, KL estimators, group advantages, losses."""
