"""The policy engine: vLLM's async engine plus versioned, exact weight updates.

Every generation runs under a shared lock; a weight update takes the lock exclusively,
so it waits for in-flight generations to finish and holds new ones back until the new
weights are in place. Each result therefore comes from exactly one version, and says which.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rlhf_common import envs, weights
from rlhf_common.errors import InvalidInput, Overloaded

from .config import PolicyConfig

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
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # return the sampled tokens' log-probs


@dataclass(frozen=True)
class Chunk:
    """A streamed piece of one completion."""

    index: int
    generation_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "" until the last chunk
    policy_version: int
    prompt_token_ids: list[int]  # on the first chunk of each completion
    prompt_text: str = ""  # the rendered prompt, on the first chunk of each completion


@dataclass(frozen=True)
class Completion:
    generation_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]  # (T,) log pi_version(token_ids[t] | prefix), raw logits; [] unless asked
    finish_reason: str


@dataclass(frozen=True)
class Generation:
    prompt_token_ids: list[int]
    completions: list[Completion]
    policy_version: int
    prompt: str = ""  # the rendered prompt text
    request_id: str = ""


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
        self.tokenizer = None
        self.layout: dict[str, tuple[int, ...]] = {}  # tensor name -> shape of the initial model
        self.in_flight = 0  # requests accepted and not finished (queue depth)
        self.api_in_flight = 0  # of those, API requests (bounded by cfg.max_in_flight)
        self.waiting = 0  # of those, waiting for a weight update to finish
        # Chat templates and tokenization run here, off the event loop; one thread, since a
        # tokenizer is not meant to be used from several threads at once.
        self._text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-tokenize")

    def start(self) -> None:
        """Build the vLLM engine (blocking, tens of seconds on CPU)."""
        # vLLM's CPU backend reads the KV-cache size from its own variable (the config checks
        # that an existing one agrees with RLHF_POLICY_KV_CACHE_GIB).
        envs.export("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
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
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model)
        try:
            self.served.sha256 = weights.digest(self.cfg.model)
            self.layout = weights.tensor_shapes(self.cfg.model)  # what every full update must match
        except FileNotFoundError:
            self.served.sha256 = ""

    async def prepare(self) -> None:
        """Work after start that needs the event loop: reading the LoRA base, if configured."""
        if self.cfg.lora_preload:
            info = await self.engine.collective_rpc("rlhf_prepare_lora", args=(self.cfg.model,))
            log.info("LoRA base read for merging: %s", info)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        self._text_pool.shutdown(wait=False)

    def _sampling_params(self, s: Sampling, stream: bool = False):
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
        if len(s.stop) > 16 or any(not x for x in s.stop):
            raise InvalidInput(f"stop={list(s.stop)!r}: at most 16 non-empty strings")
        if s.n > 1 and s.temperature == 0:
            raise InvalidInput(f"n={s.n} with temperature=0: greedy decoding gives n identical answers; "
                               "use temperature > 0 or n=1")
        try:
            return self._vllm_params(SamplingParams, RequestOutputKind, s, stream)
        except (ValueError, TypeError) as e:  # any other combination vLLM refuses is the caller's
            raise InvalidInput(f"sampling parameters: {e}") from None

    @staticmethod
    def _vllm_params(SamplingParams, RequestOutputKind, s: Sampling, stream: bool):
        return SamplingParams(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            max_tokens=s.max_tokens,
            seed=s.seed,
            stop=list(s.stop) or None,
            logprobs=0 if s.logprobs else None,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    def render(self, prompt: str, messages: list[tuple[str, str]]) -> str:
        """The prompt text: raw, or chat messages through the model's chat template."""
        if bool(prompt) == bool(messages):
            raise InvalidInput("exactly one of prompt or messages must be given")
        if prompt:
            return prompt
        for i, (role, content) in enumerate(messages):
            if role not in ("system", "user", "assistant"):
                raise InvalidInput(f"messages[{i}].role={role!r}: must be system, user or assistant")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidInput(f"model {self.cfg.model!r} has no chat template: send prompt instead of messages")
        return self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                  tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str, max_tokens: int) -> dict:
        """The prompt as vLLM token input (tokenized once, here), after checking its length."""
        ids = self.tokenizer(text, add_special_tokens=True).input_ids
        if len(ids) + max_tokens > self.cfg.max_model_len:
            raise InvalidInput(f"prompt: {len(ids)} tokens + max_tokens {max_tokens} exceed the context length "
                               f"{self.cfg.max_model_len}")
        return {"prompt_token_ids": ids}

    async def prompt_input(self, prompt: str, messages, max_tokens: int) -> tuple[str, dict]:
        """The rendered prompt text and its vLLM token input, computed off the event loop."""
        chars = len(prompt) + sum(len(c) for _, c in messages)
        if chars > self.cfg.max_prompt_chars:  # refused before any tokenizing
            raise InvalidInput(f"prompt: {chars} characters exceed the limit of {self.cfg.max_prompt_chars}")

        def work():
            text = self.render(prompt, list(messages))
            return text, self.tokenize(text, max_tokens)

        return await asyncio.get_running_loop().run_in_executor(self._text_pool, work)

    async def _enter(self, bounded: bool) -> int:
        """Wait until no weight update is running; returns the version requests will see.

        A bounded (API) request is refused while RLHF_POLICY_MAX_IN_FLIGHT API requests are
        in flight; the rollout worker's requests are not (its pacing bounds them)."""
        if bounded:
            if self.api_in_flight >= self.cfg.max_in_flight:
                raise Overloaded(f"{self.api_in_flight} requests in flight (limit {self.cfg.max_in_flight}); "
                                 "retry with back-off")
            self.api_in_flight += 1
        self.in_flight += 1
        self.waiting += 1
        try:
            await self._lock.acquire_read()
        except BaseException:
            self.in_flight -= 1
            if bounded:
                self.api_in_flight -= 1
            raise
        finally:
            self.waiting -= 1
        return self.served.version

    async def _leave(self, bounded: bool) -> None:
        self.in_flight -= 1
        if bounded:
            self.api_in_flight -= 1
        await self._lock.release_read()

    async def generate(self, prompt: str, sampling: Sampling, messages: list[tuple[str, str]] = (),
                       bounded: bool = True) -> Generation:
        params = self._sampling_params(sampling)
        text, tokens = await self.prompt_input(prompt, messages, sampling.max_tokens)
        request_id = uuid.uuid4().hex
        version = await self._enter(bounded)
        try:
            final = None
            async for out in self.engine.generate(tokens, params, request_id=request_id):
                final = out
        finally:
            await self._leave(bounded)
        completions = []
        for c in final.outputs:
            ids = list(c.token_ids)
            lps = [c.logprobs[i][t].logprob for i, t in enumerate(ids)] if c.logprobs else []
            completions.append(Completion(uuid.uuid4().hex, c.text, ids, lps, c.finish_reason or "length"))
        return Generation(list(final.prompt_token_ids), completions, version, text, request_id)

    async def generate_stream(self, prompt: str, sampling: Sampling, messages: list[tuple[str, str]] = ()):
        """Async iterator of Chunk; the whole request runs on one weight version."""
        params = self._sampling_params(sampling, stream=True)
        text, tokens = await self.prompt_input(prompt, messages, sampling.max_tokens)
        request_id = uuid.uuid4().hex
        ids = [uuid.uuid4().hex for _ in range(sampling.n)]
        started: set[int] = set()
        version = await self._enter(bounded=True)
        try:
            async for out in self.engine.generate(tokens, params, request_id=request_id):
                for c in out.outputs:
                    toks = list(c.token_ids)
                    lps = [c.logprobs[i][t].logprob for i, t in enumerate(toks)] if c.logprobs else []
                    first = c.index not in started
                    started.add(c.index)
                    yield Chunk(c.index, ids[c.index], c.text, toks, lps, c.finish_reason or "", version,
                                list(out.prompt_token_ids) if first and out.prompt_token_ids else [],
                                text if first else "")
        finally:
            await self._leave(bounded=True)

    async def apply_update(self, version: int, uri: str, sha256: str, lora: bool = False,
                           rollback: bool = False) -> float:
        """Load a full checkpoint, or a LoRA adapter over the base model, in place.

        Returns the seconds spent. Idempotent by version: an update not newer than the served
        version is ignored, unless it is a rollback to a different version."""
        if version == self.served.version or (version < self.served.version and not rollback):
            return 0.0
        path = await asyncio.get_running_loop().run_in_executor(None, weights.fetch, uri, sha256)
        loop = asyncio.get_running_loop()
        if sha256:
            await loop.run_in_executor(None, weights.verify, path, sha256)
        # (An adapter is checked against the base inside the worker, before any load. A model
        # that started from a folder without safetensors has no layout to check against.)
        if not lora and self.layout:
            await loop.run_in_executor(None, weights.check_same_layout, path, self.layout, self.cfg.model)
        t0 = time.perf_counter()
        await self._lock.acquire_write()
        try:
            if lora:
                info = await self.engine.collective_rpc("rlhf_load_lora", args=(self.cfg.model, str(path)))
            else:
                info = await self.engine.collective_rpc("rlhf_load_weights", args=(str(path),))
            await self.engine.reset_prefix_cache()
            log.info("version %d loaded (%s): %s", version, "lora" if lora else "full", info)
            self.served = ServedWeights(version=version, sha256=sha256, uri=uri)
        finally:
            await self._lock.release_write()
        return time.perf_counter() - t0
