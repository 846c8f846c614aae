"""The policy engine: vLLM's async engine plus versioned, exact weight updates.

Every generation runs under a shared lock; a weight update takes the lock exclusively,
so it waits for in-flight generations to finish and holds new ones back until the new
weights are in place. Each result therefore comes from exactly one version, and says which.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from rlhf_common import weights
from rlhf_common.config import PolicyConfig
from rlhf_common.errors import InvalidInput

log = logging.getLogger(__name__)

WORKER_EXTENSION = "rlhf_policy.vllm_ext.WeightUpdateExtension"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    max_tokens: int = 32
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    generation_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]  # (T,) log pi_version(token_ids[t] | prefix), raw logits
    finish_reason: str


@dataclass(frozen=True)
class Generation:
    prompt_token_ids: list[int]
    completions: list[Completion]
    policy_version: int


@dataclass
class ServedWeights:
    version: int = 0
    sha256: str = ""
    uri: str = ""
    updated_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))


class VersionLock:
    """Many generations or one weight update at a time (writer-preferring)."""

    def __init__(self):
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    async def acquire_read(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1

    async def release_read(self):
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    async def acquire_write(self):
        async with self._cond:
            self._writers_waiting += 1
            await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writers_waiting -= 1
            self._writer = True

    async def release_write(self):
        async with self._cond:
            self._writer = False
            self._cond.notify_all()


class PolicyEngine:
    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        self.served = ServedWeights(version=0, uri=cfg.model)
        self._lock = VersionLock()
        self.engine = None

    def start(self) -> None:
        """Build the vLLM engine (blocking, tens of seconds on CPU)."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.cfg.model,
            dtype=self.cfg.dtype,
            max_model_len=self.cfg.max_model_len,
            worker_extension_cls=WORKER_EXTENSION,
            enforce_eager=True,
            seed=self.cfg.seed,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        try:
            self.served.sha256 = weights.digest(self.cfg.model)
        except FileNotFoundError:
            self.served.sha256 = ""

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def _sampling_params(self, s: Sampling):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if s.temperature < 0:
            raise InvalidInput(f"temperature={s.temperature}: must be >= 0")
        if not 1 <= s.max_tokens < self.cfg.max_model_len:
            raise InvalidInput(f"max_tokens={s.max_tokens}: must be in [1, {self.cfg.max_model_len})")
        if not 0 < s.top_p <= 1:
            raise InvalidInput(f"top_p={s.top_p}: must be in (0, 1]")
        if s.top_k < 0:
            raise InvalidInput(f"top_k={s.top_k}: must be >= 0 (0 = off)")
        if not 1 <= s.n <= 64:
            raise InvalidInput(f"n={s.n}: must be in [1, 64]")
        return SamplingParams(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            max_tokens=s.max_tokens,
            seed=s.seed,
            logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def generate(self, prompt: str, sampling: Sampling) -> Generation:
        if not prompt:
            raise InvalidInput("prompt: must not be empty")
        params = self._sampling_params(sampling)
        await self._lock.acquire_read()
        try:
            version = self.served.version
            final = None
            async for out in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex):
                final = out
        finally:
            await self._lock.release_read()
        completions = []
        for c in final.outputs:
            ids = list(c.token_ids)
            lps = [c.logprobs[i][t].logprob for i, t in enumerate(ids)] if c.logprobs else []
            completions.append(Completion(uuid.uuid4().hex, c.text, ids, lps, c.finish_reason or "length"))
        return Generation(list(final.prompt_token_ids), completions, version)

    async def apply_update(self, version: int, uri: str, sha256: str, lora: bool = False) -> float:
        """Load a full checkpoint, or a LoRA adapter over the base model, in place.

        Returns the seconds spent. Idempotent by version."""
        if version <= self.served.version:
            return 0.0
        path = weights.local_path(uri)
        if sha256:
            await asyncio.get_running_loop().run_in_executor(None, weights.verify, path, sha256)
        t0 = time.perf_counter()
        await self._lock.acquire_write()
        try:
            if lora:
                await self.engine.collective_rpc("rlhf_load_lora", args=(self.cfg.model, str(path)))
            else:
                await self.engine.collective_rpc("rlhf_load_weights", args=(str(path),))
            await self.engine.reset_prefix_cache()
            self.served = ServedWeights(version=version, sha256=sha256, uri=uri)
        finally:
            await self._lock.release_write()
        return time.perf_counter() - t0
