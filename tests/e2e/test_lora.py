"""LoRA end to end: the trainer publishes adapter-only updates and the policy serves
base + adapter exactly as transformers/PEFT computes it."""

from __future__ import annotations

import pytest
import torch

from rlhf.events.v1 import events_pb2
from rlhf.policy.v1 import policy_pb2
from rlhf_devstack.models import tiny_prompts
from rlhf_devstack.stack import Stack, StackSpec, seed_prompts
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore

from tests.helpers import metric_value, read_topic, run_until_steps, scrape

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 3


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    spec = StackSpec(run_dir=tmp_path_factory.mktemp("lora"), rollout_n=4, max_tokens=16, groups_per_step=2,
                     max_groups_ahead=4, trainer_lr=5e-3, lora_rank=4)
    with Stack(spec) as st:
        seed_prompts(st.bus, tiny_prompts(2 * STEPS, seed=21))
        status, _, policy = run_until_steps(st, STEPS)
        yield st, status, policy


def test_updates_are_adapter_only(lora_run):
    st, status, _ = lora_run
    updates = read_topic(st.bus, Topics().weights, events_pb2.WeightUpdate, until=lambda us: len(us) >= STEPS)
    assert [u.format for u in updates] == [events_pb2.WeightUpdate.FORMAT_LORA] * STEPS
    folder = WeightStore(st.spec.run_dir / "weights").folder("policy", status.version)
    assert (folder / "adapter_config.json").exists() and not (folder / "model.safetensors").exists()
    adapter_bytes = (folder / "adapter_model.safetensors").stat().st_size
    base_bytes = (st.spec.policy_model / "model.safetensors").stat().st_size
    assert adapter_bytes < base_bytes / 4
    text = scrape(st.metrics_ports["policy"])
    assert metric_value(text, "rlhf_policy_weight_updates_total", {"outcome": "applied"}) == STEPS


def test_policy_serves_base_plus_adapter_exactly(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    st, status, policy = lora_run
    folder = WeightStore(st.spec.run_dir / "weights").folder("policy", status.version)
    base = AutoModelForCausalLM.from_pretrained(st.spec.policy_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folder).eval()
    untouched = AutoModelForCausalLM.from_pretrained(st.spec.policy_model, dtype=torch.float32).eval()
    differs = 0
    for prompt in tiny_prompts(4, seed=321):
        resp = policy.Generate(policy_pb2.GenerateRequest(
            prompt=prompt, sampling=policy_pb2.SamplingParams(temperature=0.0, max_tokens=16, logprobs=True)))
        assert resp.policy_version == status.version
        c, p = resp.completions[0], list(resp.prompt_token_ids)
        ids = torch.tensor([p + list(c.token_ids)])
        with torch.no_grad():
            hf = model.generate(input_ids=torch.tensor([p]), max_new_tokens=16, do_sample=False,
                                pad_token_id=base.config.pad_token_id)[0, len(p):].tolist()
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
            base_logp = torch.log_softmax(untouched(input_ids=ids).logits[0], -1)
        assert list(c.token_ids) == hf[: len(c.token_ids)]
        want = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
        assert max(abs(a - b) for a, b in zip(c.logprobs, want)) < 1e-3
        base_lp = [base_logp[len(p) - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
        differs += max(abs(a - b) for a, b in zip(c.logprobs, base_lp)) > 1e-3
    assert differs > 0  # the adapter changed what is served
