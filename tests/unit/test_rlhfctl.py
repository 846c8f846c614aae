"""rlhfctl's pure parts: where it finds the stack (flags > env > stack.json), metrics parsing
and rates, one line per topic record, the status table and its exit status, the join's
offsets read from its own SQLite files."""

from __future__ import annotations

import json

import pytest

from rlhf.events.v1 import events_pb2
from rlhf_common.config import ConfigError
from rlhf_common.trace import label_id
from rlhf_devstack import ctl
from rlhf_feedback.join import Incoming, Join

STACK = {"broker": {"pid": 1, "bootstrap": "127.0.0.1:19092"},
         "services": {"policy": {"pid": 2, "grpc": "127.0.0.1:15001", "metrics": 19101},
                      "trainer": {"pid": 3, "grpc": "127.0.0.1:15004", "metrics": 19104}},
         "weights": "/nowhere/weights"}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    for var in ("RLHF_KAFKA_BOOTSTRAP", "RLHF_CTL_RUN_DIR", "RLHF_CTL_TRAINER", "RLHF_CTL_POLICY", "RLHF_CTL_METRICS",
                "RLHF_CTL_WEIGHT_STORE", "RLHF_CTL_JOIN_STATE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "stack.json").write_text(json.dumps(STACK))
    (tmp_path / "weights").mkdir()
    return tmp_path


def test_stack_json_fills_what_flags_and_env_leave_open(run_dir, monkeypatch):
    t = ctl.resolve({"run_dir": str(run_dir)})
    assert t.addrs["policy"] == "127.0.0.1:15001" and t.addrs["trainer"] == "127.0.0.1:15004"
    assert t.addrs["reward"] is None
    assert t.metrics == {"policy": "127.0.0.1:19101", "trainer": "127.0.0.1:19104"}
    assert t.bus.bootstrap == "127.0.0.1:19092"
    # the weights path in stack.json does not exist from here: the run dir's own folder is used
    assert t.weight_store == str(run_dir / "weights") and t.join_state == run_dir / "feedback"
    assert t.trainer_group == "rlhf-trainer"

    monkeypatch.setenv("RLHF_CTL_TRAINER", "10.0.0.1:50054")
    monkeypatch.setenv("RLHF_KAFKA_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("RLHF_CTL_METRICS", "trainer=10.0.0.1:9104")
    t = ctl.resolve({"run_dir": str(run_dir), "policy": "localhost:7000"})
    assert t.addrs["trainer"] == "10.0.0.1:50054" and t.addrs["policy"] == "localhost:7000"
    assert t.bus.bootstrap == "kafka:9092" and t.metrics["trainer"] == "10.0.0.1:9104"
    assert ctl.resolve({"run_dir": str(run_dir)}, kafka="other:1").bus.bootstrap == "other:1"  # flag beats env


def test_settings_are_checked_and_a_named_run_dir_must_hold_a_stack(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="RLHF_CTL_METRICS='nope=1:2'"):
        ctl.resolve({"run_dir": str(run_dir), "metrics": "nope=1:2"})
    with pytest.raises(ConfigError, match="RLHF_CTL_TRAINER='nohostport'"):
        ctl.resolve({"run_dir": str(run_dir), "trainer": "nohostport"})
    with pytest.raises(ctl.CtlError, match="no stack.json in") as e:
        ctl.resolve({"run_dir": str(tmp_path / "empty")})
    assert e.value.code == 2
    with pytest.raises(ValueError, match="service=host:port"):
        ctl.parse_endpoints("policy=127.0.0.1")
    assert ctl.parse_endpoints(" policy=a:1, ,reward=b:2 ") == {"policy": "a:1", "reward": "b:2"}


def test_cli_errors_are_one_line_and_an_exit_status(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ctl.main(["pause", "--run-dir", str(tmp_path / "empty")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no stack.json in") and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        ctl.main(["pause", "--run-dir", str(run_dir)])  # stack.json names a trainer no one serves
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: trainer at 127.0.0.1:15004 unreachable (UNAVAILABLE)\n"
    with pytest.raises(SystemExit) as e:
        ctl.main(["rollback", "3", "--run-dir", str(run_dir)])
    assert e.value.code == 2
    assert "version 3 of 'policy' is not in" in capsys.readouterr().err


PROM = """# HELP rlhf_trainer_step Optimisation steps done
# TYPE rlhf_trainer_step gauge
rlhf_trainer_step 7.0
# HELP rlhf_trainer_trained_tokens_total Response tokens trained on
# TYPE rlhf_trainer_trained_tokens_total counter
rlhf_trainer_trained_tokens_total 1200.0
# HELP rlhf_trainer_kl_nats KL
# TYPE rlhf_trainer_kl_nats gauge
rlhf_trainer_kl_nats 0.0125
# HELP rlhf_trainer_requests_total gRPC requests
# TYPE rlhf_trainer_requests_total counter
rlhf_trainer_requests_total{code="OK",method="Status"} 3.0
"""


def test_metrics_parse_and_rates_between_two_scrapes():
    first = ctl.parse_metrics(PROM)
    assert first["rlhf_trainer_step"] == 7 and first['rlhf_trainer_requests_total{code="OK",method="Status"}'] == 3
    second = ctl.parse_metrics(PROM.replace("1200.0", "1500.0").replace("7.0", "9.0"))
    m = ctl.key_metrics("trainer", first, second, 2.0)
    assert m["step"] == 9 and m["tokens/s"] == 150.0 and m["KL nats"] == 0.0125
    assert "reward mean" not in m  # not exposed: not shown
    assert "tokens/s" not in ctl.key_metrics("trainer", {}, second, 2.0)  # a rate needs two scrapes


def test_one_line_per_record():
    r = events_pb2.Rollout(rollout_id="r1", prompt_id="p" * 20, policy_version=3, response_text="hello\n  world",
                           response_token_ids=[1, 2, 3], group_index=1, group_size=4)
    line = ctl.record_line("rollouts", r)
    assert "r1  v3  prompt pppppppppppp 2/4  3 tokens" in line and line.endswith('"hello world"')
    g = events_pb2.Generation(generation_id="g1", prompt="Hi", response="x" * 100, policy_version=2)
    line = ctl.record_line("generations", g)
    assert "g1  v2" in line and len(line) < 130 and "…" in line
    fb = events_pb2.Feedback(feedback_id="f1", generation_id="g1", thumb=events_pb2.THUMB_DOWN, comment="meh",
                             source=events_pb2.LABEL_SOURCE_AI)
    assert "f1  on g1  thumb down  ai  \"meh\"" in ctl.record_line("feedback", fb)
    fb = events_pb2.Feedback(feedback_id="f2", generation_id="g1", pairwise=events_pb2.Pairwise(
        other_generation_id="g2", choice=events_pb2.CHOICE_B))
    assert "pairwise b vs g2  human" in ctl.record_line("feedback", fb)
    lbl = events_pb2.Label(label_id=label_id("f3"), prompt="Q?", rating=events_pb2.Rating(
        value=4, scale_min=1, scale_max=5), responses=[events_pb2.LabelResponse(generation_id="g1", policy_version=5)])
    assert f"{label_id('f3')}  rating 4 of 1..5  human  on g1@v5" in ctl.record_line("labels", lbl)
    w = events_pb2.WeightUpdate(model_name="policy", version=2, uri="/w/2", rollback=True,
                                format=events_pb2.WeightUpdate.FORMAT_FULL)
    assert "policy  v2  full  ROLLBACK  step 0  /w/2" in ctl.record_line("weights", w)
    d = events_pb2.DeadLetter(topic="rlhf.rollouts", partition=0, offset=9, consumer="trainer", error="bad")
    assert 'rlhf.rollouts[0]@9  from trainer: "bad"' in ctl.record_line("dlq", d)
    bad = ctl.read_line("rollouts", ctl.trace_lib.Read(0, 12, 0, "k", None, "DecodeError: corrupt"))
    assert "partition 0 offset 12: undecodable (DecodeError: corrupt)" in bad


def _status(**over) -> dict:
    st = {"services": {
        "policy": {"address": "a:1", "health": "SERVING", "version": 2, "model_name": "policy"},
        "reward": {"address": None, "health": "not configured"},
        "trainer": {"address": "a:4", "health": "SERVING", "version": 5, "step": 5, "paused": True,
                    "algorithm": "grpo", "last_step": {"kind": "rl", "reward_mean": 0.25, "kl": 0.01,
                                                       "step_seconds": 1.5}},
        "feedback": {"address": "a:5", "health": "unreachable"}},
        "lag": {"policy_versions_behind": 3, "trainer_group": "rlhf-trainer", "trainer_rollouts": 8,
                "join_feedback": None},
        "kafka": {"bootstrap": "k:9", "reachable": True},
        "metrics": {"trainer": {"tokens/s": 12.5}, "policy": {"error": "a:9 unreachable (URLError)"}},
        "window_s": 1.0}
    st.update(over)
    return st


def test_status_table_and_what_makes_it_fail():
    text = ctl.render_status(_status())
    lines = text.splitlines()
    assert lines[0].split() == ["SERVICE", "ADDRESS", "HEALTH", "VERSION", "DETAIL"]
    assert "trainer" in lines[3] and "v5" in lines[3] and "PAUSED" in lines[3] and "1.50 s" in lines[3]
    assert "policy serves v2, trainer published v5: 3 versions behind" in text
    assert "trainer on rollouts (group rlhf-trainer): 8 records behind" in text
    assert "join on feedback: no join state found" in text
    assert "trainer  tokens/s 12.5" in text and "a:9 unreachable" in text
    assert ctl.problems(_status()) == ["feedback at a:5: unreachable"]
    down = _status(kafka={"bootstrap": "k:9", "reachable": False, "error": "Kafka at k:9 unreachable (X)"})
    assert "consumer lags: unknown (Kafka at k:9 unreachable (X))" in ctl.render_status(down)
    assert ctl.problems(down)[-1] == "Kafka at k:9 unreachable (X)"


def test_join_offsets_from_the_feedback_services_own_files(tmp_path):
    assert ctl.join_offsets(tmp_path) is None
    join = Join(tmp_path / "join-all.sqlite", wait_s=60, retention_s=3600, max_generations=100)
    fb = events_pb2.Feedback(feedback_id="f1", generation_id="g1", thumb=events_pb2.THUMB_UP)
    join.process([Incoming("feedback", 0, 41, fb),
                  Incoming("generation", 0, 7, events_pb2.Generation(generation_id="g1", prompt="p", response="r"))])
    assert ctl.join_offsets(tmp_path) == {0: 42}  # read while the join holds it open
    assert ctl.join_offsets(tmp_path, "generation") == {0: 8}
    join.close()
