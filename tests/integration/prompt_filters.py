"""A prompt filter hook as an operator would write one (RLHF_FEEDBACK_PROMPT_FILTER)."""

from __future__ import annotations


def no_passwords(prompt: str) -> bool:
    return "password" not in prompt.lower()
