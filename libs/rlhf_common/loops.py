"""Background threads for the services' Kafka loops.

A loop that raises records the error; the service's server polls it (`Server.run(watch=...)`)
and exits so that its supervisor restarts it from committed state.
"""

from __future__ import annotations

import abc
import logging
import threading

log = logging.getLogger(__name__)


class BackgroundLoop(threading.Thread, abc.ABC):
    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        try:
            self.loop_body()
        except BaseException as e:  # surfaced through health and logs
            self.error = e
            log.exception("%s died", self.name)

    @abc.abstractmethod
    def loop_body(self) -> None:
        """The thread's work; return when self.stopping is set."""


def first_error(loops: list[BackgroundLoop]) -> BaseException | None:
    return next((t.error for t in loops if t.error is not None), None)
