"""Policy service: vLLM generation, rollout worker, weight-update consumer."""
