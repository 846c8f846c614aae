"""Production prompts into the RL loop: a sampled share of the prompts users send goes to
rlhf.prompts, so rollouts follow what users actually ask.

Sampling is by request, decided by a hash of the request id: the same request is always in
or out (re-reading the topic after a restart picks the same prompts, under the same prompt
ids, which the rollout worker deduplicates), and the n answers of one request make one prompt.
A filter hook, `module:function` taking the prompt text and returning whether it may be
trained on, can drop prompts (personal data, unsafe content, ...).
"""

from __future__ import annotations

import hashlib
import importlib
from typing import Callable

from rlhf.events.v1 import events_pb2

PromptFilter = Callable[[str], bool]


def load_filter(spec: str) -> PromptFilter | None:
    """The function named by 'module:function', or None for an empty spec."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{spec!r}: expected 'module:function'")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {module} has no function {name!r}")
    return fn


def sampled(request_id: str, rate: float) -> bool:
    """Whether this request's prompt is in the sample (deterministic in the request id)."""
    if rate <= 0:
        return False
    return int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) < rate * 0x1_0000_0000


def production_prompt(g: events_pb2.Generation, rate: float, keep: PromptFilter | None, max_chars: int,
                      now_ms: int) -> tuple[events_pb2.Prompt | None, str]:
    """(the prompt to send or None, outcome): sampled, unsampled, or filtered."""
    if not sampled(g.request_id or g.generation_id, rate):
        return None, "unsampled"
    if not g.prompt.strip() or len(g.prompt) > max_chars or (keep is not None and not keep(g.prompt)):
        return None, "filtered"
    pid = "prod-" + hashlib.sha256((g.request_id or g.generation_id).encode()).hexdigest()[:32]
    return events_pb2.Prompt(prompt_id=pid, text=g.prompt, source="production", created_unix_ms=now_ms), "sampled"
