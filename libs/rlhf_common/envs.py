"""The one place that reads environment variables.

Every setting a service takes from the environment is named RLHF_<SERVICE>_<FIELD>
(or RLHF_<FIELD> for settings shared by all services, such as the Kafka bootstrap
address). Config classes in ``config.py`` ask this module for raw strings and do the
typing and validation themselves.
"""

from __future__ import annotations

import os


def get(name: str) -> str | None:
    """Raw value of an environment variable, or None when unset or empty."""
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def export(name: str, value: str) -> None:
    """Set a variable for a library that reads its settings from the environment (e.g. vLLM)."""
    os.environ[name] = value


def snapshot(prefix: str = "RLHF_") -> dict[str, str]:
    """All variables with the given prefix (for logging the effective config)."""
    return {k: v for k, v in os.environ.items() if k.startswith(prefix)}
