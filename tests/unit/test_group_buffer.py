from __future__ import annotations

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Received
from rlhf_trainer.core import GroupBuffer


def _rec(prompt: str, idx: int, size: int, offset: int, partition: int = 0) -> Received:
    r = events_pb2.Rollout(rollout_id=f"{prompt}-{idx}-{offset}", prompt_id=prompt, group_index=idx,
                           group_size=size)
    return Received(r, "rlhf.rollouts", partition, offset, prompt)


def test_groups_complete_in_arrival_order_and_duplicates_ignored():
    b = GroupBuffer()
    for rec in [_rec("a", 0, 2, 0), _rec("b", 0, 2, 1), _rec("a", 0, 2, 2), _rec("b", 1, 2, 3), _rec("a", 1, 2, 4)]:
        b.add(rec)
    assert [[r.record.prompt_id for r in g] for g in b.complete] == [["b", "b"], ["a", "a"]]
    assert [r.offset for r in b.complete[1]] == [0, 4]  # the re-sent a/0 at offset 2 was dropped


def test_safe_offsets_never_skip_incomplete_groups():
    b = GroupBuffer()
    for rec in [_rec("a", 0, 2, 0), _rec("b", 0, 1, 1), _rec("c", 0, 1, 2)]:
        b.add(rec)
    taken = [r for g in b.take(2) for r in g]  # b and c are complete; a is still pending at offset 0
    assert [r.record.prompt_id for r in taken] == ["b", "c"]
    assert b.safe_offsets(taken) == {0: 0}
    b.add(_rec("a", 1, 2, 3))
    taken = [r for g in b.take(1) for r in g]
    assert b.safe_offsets(taken) == {0: 4}


def test_a_prompt_resampled_after_a_policy_crash_is_trained_once():
    # The policy wrote a's group, died before committing the prompt offset, and sampled a again
    # after its restart: new rollout ids, same prompt id.
    b = GroupBuffer()
    for rec in [_rec("a", 0, 2, 0), _rec("a", 1, 2, 1), _rec("a", 0, 2, 2), _rec("a", 1, 2, 3), _rec("b", 0, 1, 4)]:
        b.add(rec)
    assert [[r.offset for r in g] for g in b.complete] == [[0, 1], [4]]
    assert b.repeated == 2
    taken = [r for g in b.take(2) for r in g]
    assert b.safe_offsets(taken) == {0: 5}  # the dropped repeats are not held back either


def test_prompts_taken_before_a_restart_stay_done():
    b = GroupBuffer(done_prompts=["a"])
    for rec in [_rec("a", 0, 1, 7), _rec("c", 0, 1, 8)]:
        b.add(rec)
    assert [[r.record.prompt_id for r in g] for g in b.complete] == [["c"]] and b.repeated == 1
