"""The policy service (vLLM) as a process with the real broker: streaming, chat, stop strings,
recorded generations, weight updates under concurrent load, and rollback."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from rlhf.events.v1 import events_pb2
from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf_common.bus import Producer
from rlhf_devstack.models import tiny_prompts
from rlhf_devstack.stack import Stack, StackSpec
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore
from rlhf_policy.rollback import build_update

from tests.helpers import metric_value, read_topic, scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = tiny_prompts(8, seed=77)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def policy_stack(tmp_path_factory):
    spec = StackSpec(run_dir=tmp_path_factory.mktemp("policy"), services=("policy",), rollout_enabled=False)
    with Stack(spec) as st:
        yield st, policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(st.addrs["policy"]))


@pytest.fixture(scope="module")
def versions(policy_stack, tmp_path_factory):
    """Versions 1-4 of the policy: the base weights plus growing noise, in a weight store."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st, _ = policy_stack
    store = WeightStore(tmp_path_factory.mktemp("store"))
    tok = AutoTokenizer.from_pretrained(st.spec.policy_model)
    models = {0: AutoModelForCausalLM.from_pretrained(st.spec.policy_model, dtype=torch.float32).eval()}
    for v in range(1, 5):
        m = AutoModelForCausalLM.from_pretrained(st.spec.policy_model, dtype=torch.float32)
        torch.manual_seed(v)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        store.save(m, tok, "policy", v, step=v)
        models[v] = m.eval()
    return store, models


def _greedy(prompt: str, **kw) -> policy_pb2.GenerateRequest:
    kw.setdefault("logprobs", True)
    return policy_pb2.GenerateRequest(prompt=prompt, sampling=policy_pb2.SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, **kw))


_hf_cache: dict = {}


def _hf_greedy(model, version: int, prompt_ids: list[int]) -> list[int]:
    key = (version, tuple(prompt_ids))
    if key not in _hf_cache:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 pad_token_id=model.config.pad_token_id)
        _hf_cache[key] = out[0, len(prompt_ids):].tolist()
    return _hf_cache[key]


def _publish(st, update: events_pb2.WeightUpdate) -> None:
    p = Producer(st.bus, "test")
    try:
        p.send(Topics().weights, update.model_name, update)
    finally:
        p.close()


def _wait_version(stub, version: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while stub.GetVersion(policy_pb2.GetVersionRequest()).version != version:
        assert time.monotonic() < deadline, f"policy never served version {version}"
        time.sleep(0.1)


def test_stream_equals_unary(policy_stack):
    st, stub = policy_stack
    unary = stub.Generate(_greedy(PROMPTS[0]))
    chunks = list(stub.GenerateStream(_greedy(PROMPTS[0])))
    assert len(chunks) > 1  # it really streams
    assert len(unary.completions[0].logprobs) == len(unary.completions[0].token_ids)
    assert [t for c in chunks for t in c.token_ids] == list(unary.completions[0].token_ids)
    assert "".join(c.text for c in chunks) == unary.completions[0].text
    assert sum((list(c.logprobs) for c in chunks), []) == pytest.approx(list(unary.completions[0].logprobs))
    assert list(chunks[0].prompt_token_ids) == list(unary.prompt_token_ids)
    assert chunks[-1].finish_reason in ("stop", "length") and all(not c.finish_reason for c in chunks[:-1])
    assert len({c.generation_id for c in chunks}) == 1
    text = scrape(st.metrics_ports["policy"])
    assert metric_value(text, "rlhf_policy_time_to_first_token_seconds_count") >= 1
    assert metric_value(text, "rlhf_policy_requests_total", {"method": "GenerateStream", "code": "OK"}) >= 1


def test_logprobs_only_when_asked(policy_stack):
    _, stub = policy_stack
    asked = stub.Generate(_greedy(PROMPTS[0]))
    plain = stub.Generate(_greedy(PROMPTS[0], logprobs=False))
    assert list(plain.completions[0].token_ids) == list(asked.completions[0].token_ids)
    assert len(asked.completions[0].logprobs) == len(asked.completions[0].token_ids) > 0
    assert list(plain.completions[0].logprobs) == []
    assert all(not c.logprobs for c in stub.GenerateStream(_greedy(PROMPTS[0], logprobs=False)))


def test_sampling_parameters_reach_the_engine(policy_stack):
    _, stub = policy_stack

    def sample(**kw) -> list[int]:
        return list(stub.Generate(policy_pb2.GenerateRequest(prompt=PROMPTS[6], sampling=policy_pb2.SamplingParams(
            temperature=1.0, max_tokens=MAX_TOKENS, **kw))).completions[0].token_ids)

    greedy = list(stub.Generate(_greedy(PROMPTS[6])).completions[0].token_ids)
    assert sample(seed=11, has_seed=True) == sample(seed=11, has_seed=True)  # a seed makes a sample repeatable
    seeded = {tuple(sample(seed=s, has_seed=True)) for s in range(4)}
    assert len(seeded) > 1  # ... and different seeds give different samples
    assert sample(top_k=1) == greedy  # top_k=1 leaves only the argmax
    assert sample(top_p=1e-6) == greedy  # so does a vanishing nucleus
    many = stub.Generate(policy_pb2.GenerateRequest(prompt=PROMPTS[6], sampling=policy_pb2.SamplingParams(
        temperature=1.0, max_tokens=MAX_TOKENS, n=5)))
    assert len(many.completions) == 5 and len({c.generation_id for c in many.completions}) == 5


def test_stop_strings_cut_the_answer(policy_stack):
    _, stub = policy_stack
    full = stub.Generate(_greedy(PROMPTS[1])).completions[0]
    assert len(full.text) > 4
    stop = full.text[len(full.text) // 2:][:3]
    cut = stub.Generate(_greedy(PROMPTS[1], stop=[stop])).completions[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text) and len(cut.text) < len(full.text)


def test_chat_messages_use_the_chat_template(policy_stack):
    from transformers import AutoTokenizer

    st, stub = policy_stack
    messages = [("system", "Be kind."), ("user", "Tell me about the cat.")]
    chat = stub.Generate(policy_pb2.GenerateRequest(
        messages=[policy_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        sampling=policy_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)))
    rendered = AutoTokenizer.from_pretrained(st.spec.policy_model).apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=True)
    raw = stub.Generate(_greedy(rendered))
    assert list(chat.prompt_token_ids) == list(raw.prompt_token_ids)
    assert list(chat.completions[0].token_ids) == list(raw.completions[0].token_ids)


@pytest.mark.parametrize("request_,needle", [
    (policy_pb2.GenerateRequest(), "exactly one of prompt or messages"),
    (policy_pb2.GenerateRequest(prompt="x", messages=[policy_pb2.ChatMessage(role="user", content="y")]),
     "exactly one of prompt or messages"),
    (policy_pb2.GenerateRequest(messages=[policy_pb2.ChatMessage(role="robot", content="y")]), "role='robot'"),
    (policy_pb2.GenerateRequest(prompt="x", sampling=policy_pb2.SamplingParams(stop=[""])), "stop="),
    (policy_pb2.GenerateRequest(prompt="cat " * 600), "exceed the context length 512"),
    # top_p outside (0, 1] reaches the engine's check instead of being rewritten to 1.0
    (policy_pb2.GenerateRequest(prompt="x", sampling=policy_pb2.SamplingParams(top_p=1.5)), "top_p=1.5"),
    (policy_pb2.GenerateRequest(prompt="x", sampling=policy_pb2.SamplingParams(top_p=-0.5)), "top_p=-0.5"),
    # greedy decoding with n > 1 is the caller's mistake, not an internal error
    (policy_pb2.GenerateRequest(prompt="x", sampling=policy_pb2.SamplingParams(n=3, temperature=0.0)),
     "n=3 with temperature=0"),
    # refused by its length in characters, before any tokenizing
    (policy_pb2.GenerateRequest(prompt="c" * 70_000), "70000 characters exceed the limit of 65536"),
])
def test_bad_requests_are_invalid_argument(policy_stack, request_, needle):
    _, stub = policy_stack
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as e:
            call(request_)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()


def test_answers_are_recorded_for_feedback(policy_stack):
    st, stub = policy_stack
    resp = stub.Generate(policy_pb2.GenerateRequest(prompt=PROMPTS[2], sampling=policy_pb2.SamplingParams(
        temperature=1.0, n=3, max_tokens=MAX_TOKENS)))
    streamed = list(stub.GenerateStream(_greedy(PROMPTS[3])))
    want = {c.generation_id: c.text for c in resp.completions}
    want[streamed[0].generation_id] = "".join(c.text for c in streamed)
    recs = read_topic(st.bus, Topics().generations, events_pb2.Generation,
                      until=lambda rs: want.keys() <= {r.generation_id for r in rs})
    got = {r.generation_id: r for r in recs if r.generation_id in want}
    assert {g: r.response for g, r in got.items()} == want
    assert all(r.policy_version == resp.policy_version and r.prompt_token_ids for r in got.values())
    assert len({got[c.generation_id].request_id for c in resp.completions}) == 1


def test_64_concurrent_streams_while_3_updates_land(policy_stack, versions):
    """No request fails, and every answer equals transformers under the version it names."""
    st, stub = policy_stack
    store, models = versions
    _wait_version(stub, 0)
    results, failures = [], []

    async def client(i: int, stop: asyncio.Event):
        async with grpc.aio.insecure_channel(st.addrs["policy"]) as ch:
            s = policy_pb2_grpc.PolicyServiceStub(ch)
            while True:
                prompt = PROMPTS[i % len(PROMPTS)]
                try:
                    chunks = [c async for c in s.GenerateStream(_greedy(prompt))]
                    results.append((chunks[0].policy_version, list(chunks[0].prompt_token_ids),
                                    [t for c in chunks for t in c.token_ids],
                                    {c.policy_version for c in chunks}))
                except grpc.RpcError as e:
                    failures.append(e)
                if stop.is_set():
                    return

    def updater():
        for v in (1, 2, 3):
            time.sleep(0.4)
            ck = store.load_manifest("policy", v)
            _publish(st, events_pb2.WeightUpdate(model_name="policy", version=v, uri=str(ck.path),
                                                 format=events_pb2.WeightUpdate.FORMAT_FULL, sha256=ck.sha256))
            _wait_version(stub, v)

    async def run():
        stop = asyncio.Event()
        tasks = [asyncio.create_task(client(i, stop)) for i in range(64)]
        await asyncio.get_running_loop().run_in_executor(None, updater)
        await asyncio.sleep(0.5)  # traffic keeps flowing on the last version
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(run())
    assert failures == []
    assert len(results) >= 64
    seen = {v for v, *_ in results}
    assert {0, 3} <= seen and len(seen) >= 3, seen
    for version, prompt_ids, tokens, chunk_versions in results:
        assert chunk_versions == {version}  # one version per answer
        assert tokens == _hf_greedy(models[version], version, prompt_ids)[: len(tokens)]
    text = scrape(st.metrics_ports["policy"])
    assert metric_value(text, "rlhf_policy_weight_sync_seconds_count") >= 3


def test_rollback_then_forward_again(policy_stack, versions):
    st, stub = policy_stack
    store, models = versions
    _wait_version(stub, 3)
    _publish(st, build_update("policy", 1, str(store.root), None))
    _wait_version(stub, 1)
    resp = stub.Generate(_greedy(PROMPTS[4]))
    assert resp.policy_version == 1
    assert list(resp.completions[0].token_ids) == _hf_greedy(models[1], 1, list(resp.prompt_token_ids))
    # an older, non-rollback update is ignored; a newer one applies
    ck2 = store.load_manifest("policy", 2)
    ck4 = store.load_manifest("policy", 4)
    _publish(st, events_pb2.WeightUpdate(model_name="policy", version=4, uri=str(ck4.path), sha256=ck4.sha256,
                                         format=events_pb2.WeightUpdate.FORMAT_FULL))
    _wait_version(stub, 4)
    _publish(st, events_pb2.WeightUpdate(model_name="policy", version=2, uri=str(ck2.path), sha256=ck2.sha256))
    time.sleep(1.0)
    assert stub.GetVersion(policy_pb2.GetVersionRequest()).version == 4
    text = scrape(st.metrics_ports["policy"])
    assert metric_value(text, "rlhf_policy_weight_updates_total", {"outcome": "rolled_back"}) == 1
    # rolling back to the initial model (version 0) by its folder
    _publish(st, build_update("policy", 0, None, str(st.spec.policy_model)))
    _wait_version(stub, 0)
    resp = stub.Generate(_greedy(PROMPTS[5]))
    assert list(resp.completions[0].token_ids) == _hf_greedy(models[0], 0, list(resp.prompt_token_ids))


def test_rollback_command_errors():
    with pytest.raises(ValueError, match="exactly one of"):
        build_update("policy", 1, None, None)
    with pytest.raises(ValueError, match="--version=-1"):
        build_update("policy", -1, "/x", None)


def _lora_version(st, store, version: int, targets: list[str], seed: int):
    """A PEFT adapter on the policy's base with random (non-zero) B, saved as `version`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(st.spec.policy_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    ck = store.save(model, AutoTokenizer.from_pretrained(st.spec.policy_model), "policy", version, step=version)
    return ck, model.eval()


def _assert_serves(stub, model, version: int, prompts) -> None:
    """Greedy tokens equal PEFT's; log-probs within 1e-3 of PEFT's teacher-forced ones."""
    for prompt in prompts:
        resp = stub.Generate(_greedy(prompt))
        assert resp.policy_version == version
        c, p = resp.completions[0], list(resp.prompt_token_ids)
        with torch.no_grad():
            hf = model.generate(input_ids=torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                pad_token_id=model.config.pad_token_id)[0, len(p):].tolist()
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + list(c.token_ids)])).logits[0], -1)
        assert list(c.token_ids) == hf[: len(c.token_ids)]
        want = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
        assert max(abs(a - b) for a, b in zip(c.logprobs, want)) < 1e-3


def test_lora_updates_with_changing_targets_and_rollback(policy_stack, versions):
    """Adapters merge onto the base exactly; a weight the previous adapter changed and the next
    one does not goes back to the base; a rollback to an adapter version serves it again."""
    st, stub = policy_stack
    store, models = versions
    _wait_version(stub, 0)  # the previous test ends on the initial model, loaded as full weights
    ck5, peft5 = _lora_version(st, store, 5, ["q_proj", "v_proj", "gate_proj"], seed=5)
    ck6, peft6 = _lora_version(st, store, 6, ["o_proj", "up_proj"], seed=6)
    prompts = PROMPTS[:3]
    for ck, model in ((ck5, peft5), (ck6, peft6)):
        _publish(st, events_pb2.WeightUpdate(model_name="policy", version=ck.version, uri=str(ck.path),
                                             sha256=ck.sha256, format=events_pb2.WeightUpdate.FORMAT_LORA,
                                             created_unix_ms=int(time.time() * 1000)))
        _wait_version(stub, ck.version)
        _assert_serves(stub, model, ck.version, prompts)
    # the two adapters really serve different answers from each other and from the base
    p_ids = list(stub.Generate(_greedy(prompts[0])).prompt_token_ids)
    answers = {tuple(_hf_greedy(models[0], 0, p_ids))}
    for model in (peft5, peft6):
        with torch.no_grad():
            answers.add(tuple(model.generate(input_ids=torch.tensor([p_ids]), max_new_tokens=MAX_TOKENS,
                                             do_sample=False, pad_token_id=model.config.pad_token_id)[0, len(p_ids):]
                              .tolist()))
    assert len(answers) == 3, "the adapters are too weak to tell apart: the test would prove nothing"
    update = build_update("policy", 5, str(store.root), None)
    assert update.format == events_pb2.WeightUpdate.FORMAT_LORA
    _publish(st, update)
    _wait_version(stub, 5)
    _assert_serves(stub, peft5, 5, prompts)
    text = scrape(st.metrics_ports["policy"])
    assert metric_value(text, "rlhf_policy_weight_event_to_serving_seconds_count") >= 3
    assert metric_value(text, "rlhf_policy_weight_updates_total", {"outcome": "rolled_back"}) == 3


def _wait_failed(st, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (metric_value(scrape(st.metrics_ports["policy"]), "rlhf_policy_weight_updates_total",
                        {"outcome": "failed"}) or 0) < n:
        assert time.monotonic() < deadline, f"fewer than {n} failed updates counted"
        time.sleep(0.1)


def test_bad_updates_are_refused_and_the_served_weights_stay_whole(policy_stack, versions, tmp_path):
    """A wrong sha256, a checkpoint missing a tensor, and an adapter for a module the model
    lacks are each refused before any weight is touched; the next good update applies."""
    from safetensors.torch import load_file, save_file

    from rlhf_common.weights import digest

    st, stub = policy_stack
    store, models = versions
    _publish(st, build_update("policy", 2, str(store.root), None))
    _wait_version(stub, 2)

    def served_is(version: int) -> None:
        assert stub.GetVersion(policy_pb2.GetVersionRequest()).version == version
        for prompt in PROMPTS[:3]:
            resp = stub.Generate(_greedy(prompt))
            assert resp.policy_version == version
            assert list(resp.completions[0].token_ids) == _hf_greedy(models[version], version,
                                                                     list(resp.prompt_token_ids))

    full = events_pb2.WeightUpdate.FORMAT_FULL
    ck3 = store.load_manifest("policy", 3)
    _publish(st, events_pb2.WeightUpdate(model_name="policy", version=7, uri=str(ck3.path), sha256="0" * 64,
                                         format=full))
    _wait_failed(st, 1)
    served_is(2)

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    tensors = load_file(str(ck3.path / "model.safetensors"))
    dropped = next(k for k in tensors if "layers.1.mlp.down_proj" in k)
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(incomplete / "model.safetensors"))
    _publish(st, events_pb2.WeightUpdate(model_name="policy", version=8, uri=str(incomplete),
                                         sha256=digest(incomplete), format=full))
    _wait_failed(st, 2)
    served_is(2)
    assert "does not fit the model" in (st.spec.run_dir / "policy.log").read_text()

    adapter = tmp_path / "adapter"
    ck5 = store.load_manifest("policy", 5)  # the LoRA version of the test above
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((ck5.path / "adapter_config.json").read_text())
    lora = load_file(str(ck5.path / "adapter_model.safetensors"))
    save_file({k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.zz_proj"): v for k, v in lora.items()},
              str(adapter / "adapter_model.safetensors"))
    _publish(st, events_pb2.WeightUpdate(model_name="policy", version=9, uri=str(adapter), sha256=digest(adapter),
                                         format=events_pb2.WeightUpdate.FORMAT_LORA))
    _wait_failed(st, 3)
    served_is(2)
    assert "zz_proj.weight', which the base model" in (st.spec.run_dir / "policy.log").read_text()

    ck4 = store.load_manifest("policy", 4)
    _publish(st, events_pb2.WeightUpdate(model_name="policy", version=10, uri=str(ck4.path), sha256=ck4.sha256,
                                         format=full))
    _wait_version(stub, 10)
    models[10] = models[4]
    served_is(10)
