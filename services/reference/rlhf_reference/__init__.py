"""Reference service: per-token log-probs of the frozen reference model."""
