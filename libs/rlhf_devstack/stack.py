"""The local stack: the broker and the services as processes on loopback ports.

Used by `make up` / `make down`, by `make demo`, and by the integration and e2e tests.

    python -m rlhf_devstack.stack up --run-dir .run     # start in the background, print ports
    python -m rlhf_devstack.stack seed --run-dir .run   # send prompts to the running stack
    python -m rlhf_devstack.stack down --run-dir .run   # stop what `up` started
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf_common.bus import Producer, now_ms
from rlhf_common.config import BusConfig
from rlhf_common.topics import Topics
from rlhf_feedback.config import FeedbackConfig
from rlhf_policy.config import PolicyConfig
from rlhf_reference.config import ReferenceConfig
from rlhf_reward.config import RewardConfig
from rlhf_reward_learner.config import RewardLearnerConfig
from rlhf_trainer.config import TrainerConfig

from .devbroker import DevBroker

SERVICES = ("reward", "reference", "trainer", "feedback", "reward_learner", "policy")
CONFIGS = {"policy": PolicyConfig, "reward": RewardConfig, "reference": ReferenceConfig, "trainer": TrainerConfig,
           "feedback": FeedbackConfig, "reward_learner": RewardLearnerConfig}


class PortTaken(RuntimeError):
    """A service could not bind the port picked for it."""


# What a service logs when its port is taken: gRPC, uvicorn, or the metrics server.
BIND_ERRORS = re.compile(r"Failed to bind|Address already in use|address already in use|Errno 98")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(addr: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait until the standard gRPC health service at addr says SERVING."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and proc.poll() is not None:
                tail = log.read_text()[-3000:] if log and log.exists() else ""
                raise RuntimeError(f"service at {addr} exited with code {proc.returncode}:\n{tail}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"service at {addr} not healthy after {timeout_s:.0f}s")
            time.sleep(0.3)


@dataclass
class StackSpec:
    """Everything needed to start the stack; ports of 0 are picked free at start."""

    run_dir: Path
    policy_model: Path | None = None
    reward_model: Path | None = None
    rollout_n: int = 4
    max_tokens: int = 16
    groups_per_step: int = 2
    max_groups_ahead: int = 4
    trainer_lr: float = 1e-4
    kl_beta: float = 0.05
    trainer_max_steps: int = 0
    lora_rank: int = 0
    eval_prompts: Path | None = None
    eval_every: int = 0
    topic_prefix: str = "rlhf"
    # False: every port is picked free (tests). True: the documented defaults of each
    # service's config (Kafka 9092, gRPC 50051-50054, metrics 9101-9104), for `make up`.
    default_ports: bool = False
    # Which services to start (the broker always starts).
    services: tuple[str, ...] = SERVICES
    rollout_enabled: bool = True
    policy_dtype: str = "float32"
    extra_env: dict[str, str] = field(default_factory=dict)
    # Restart a service that exits, as Kubernetes would (at most `restart_limit` times per
    # service within `restart_window_s`; then it stays down and `failed` names it).
    supervise: bool = False
    restart_limit: int = 5
    restart_window_s: float = 600.0
    # Per service, extra environment for its process (e.g. failpoints).
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class Stack:
    spec: StackSpec
    broker: DevBroker | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    addrs: dict[str, str] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    bus: BusConfig | None = None
    configs: dict[str, object] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)  # monotonic times of supervised restarts
    failed: set[str] = field(default_factory=set)  # services that used up their restarts
    _supervisor: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def prepare_models(self) -> None:
        from .models import make_tiny_llama, make_tiny_reward_model

        models = self.spec.run_dir / "models"
        if self.spec.policy_model is None:
            self.spec.policy_model = make_tiny_llama(models / "tiny-policy")
        if self.spec.reward_model is None:
            self.spec.reward_model = make_tiny_reward_model(models / "tiny-reward", self.spec.policy_model)

    def start(self, detach: bool = False, health_timeout_s: float = 300.0, verbose: bool = False,
              port_attempts: int = 3) -> "Stack":
        """Start the broker and the services and wait until each is healthy. A port picked as
        free can be taken by another process before the service binds it: then the whole
        stack starts again on other free ports (up to `port_attempts` times in all)."""
        for attempt in range(1, port_attempts + 1):
            try:
                return self._start_once(detach, health_timeout_s, verbose)
            except PortTaken as e:
                if self.spec.default_ports or attempt == port_attempts:
                    raise
                print(f"{e}; starting again on other free ports", flush=True)
                self._stopping.clear()
        raise AssertionError("unreachable")

    def _start_once(self, detach: bool, health_timeout_s: float, verbose: bool) -> "Stack":
        s = self.spec
        s.run_dir.mkdir(parents=True, exist_ok=True)
        self.prepare_models()
        if s.default_ports:
            ports = {n: (CONFIGS[n].default_of("port", "server"), CONFIGS[n].default_of("metrics_port", "server"))
                     for n in SERVICES}
            broker_port = int(BusConfig.default_of("bootstrap").rsplit(":", 1)[1])
        else:
            ports = {n: (free_port(), free_port()) for n in SERVICES}
            broker_port = free_port()
        self.broker = DevBroker(port=broker_port, log_path=s.run_dir / "broker.log").start()
        self.bus = BusConfig(bootstrap=self.broker.bootstrap, topic_prefix=s.topic_prefix)
        self.addrs = {n: f"127.0.0.1:{p[0]}" for n, p in ports.items()}
        self.metrics_ports = {n: p[1] for n, p in ports.items()}

        def server(name: str) -> dict:
            return {"port": ports[name][0], "metrics_port": ports[name][1]}

        self.configs = {
            "reward": RewardConfig(model=str(s.reward_model), server=server("reward"),
                                   http_port=RewardConfig.default_of("http_port") if s.default_ports
                                   else free_port()),
            "reference": ReferenceConfig(model=str(s.policy_model), server=server("reference")),
            "trainer": TrainerConfig(
                model=str(s.policy_model), weight_store=str(s.run_dir / "weights"), server=server("trainer"),
                reward_addr=self.addrs["reward"],
                reference_addr=self.addrs["reference"], groups_per_step=s.groups_per_step, lr=s.trainer_lr,
                kl_beta=s.kl_beta, max_steps=s.trainer_max_steps,
                lora_rank=s.lora_rank,
                eval_prompts=str(s.eval_prompts or ""), eval_every=s.eval_every if s.eval_prompts else 0,
            ),
            "feedback": FeedbackConfig(server=server("feedback"), state_dir=str(s.run_dir / "feedback"),
                                       http_port=FeedbackConfig.default_of("http_port") if s.default_ports
                                       else free_port()),
            "reward_learner": RewardLearnerConfig(server=server("reward_learner"), model=str(s.reward_model),
                                                  weight_store=str(s.run_dir / "weights")),
            "policy": PolicyConfig(
                model=str(s.policy_model), server=server("policy"),
                rollout_n=s.rollout_n, max_tokens=s.max_tokens, max_groups_ahead=s.max_groups_ahead,
                dtype=s.policy_dtype, rollout_enabled=s.rollout_enabled, lora_preload=s.lora_rank > 0,
            ),
        }
        for name in s.services:
            self._spawn(name)
        t0 = time.monotonic()
        try:
            for name in s.services:
                wait_healthy(self.addrs[name], health_timeout_s, self.procs[name], s.run_dir / f"{name}.log")
                if verbose:
                    print(f"  {name:<14} ready at {self.addrs[name]} after {time.monotonic() - t0:.0f}s", flush=True)
        except BaseException as e:
            self.stop()
            if isinstance(e, RuntimeError) and BIND_ERRORS.search(str(e)):
                raise PortTaken(f"{str(e).splitlines()[0]} (its port was taken)") from e
            raise
        if s.supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="stack-supervisor", daemon=True)
            self._supervisor.start()
        if detach:
            self.write_state()
        return self

    def _supervise(self) -> None:
        """Restart services that exited (crashed, or ended themselves after a failure)."""
        while not self._stopping.wait(0.5):
            for name in list(self.procs):
                with self._lock:
                    p = self.procs.get(name)
                    if self._stopping.is_set() or p is None or p.poll() is None or name in self.failed:
                        continue
                    now = time.monotonic()
                    recent = [t for t in self.restarts.get(name, []) if now - t < self.spec.restart_window_s]
                    if len(recent) >= self.spec.restart_limit:
                        self.failed.add(name)
                        print(f"{name} exited with {p.returncode} and was restarted {len(recent)} times in "
                              f"{self.spec.restart_window_s:.0f}s: left down (see {name}.log)", flush=True)
                        continue
                    self._reap(p)
                    self.restarts[name] = recent + [now]
                    self._spawn(name)

    def _spawn(self, name: str) -> None:
        env = {**os.environ, **self.bus.to_env(), **self.configs[name].to_env(), **self.spec.extra_env,
               **self.spec.service_env.get(name, {}), "PYTHONUNBUFFERED": "1"}
        with open(self.spec.run_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"rlhf_{name}"], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @staticmethod
    def _reap(p: subprocess.Popen) -> None:
        """Kill whatever is left of a service's process group (e.g. vLLM's engine process)."""
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self, name: str) -> int:
        """SIGKILL one service (and its children), as a crash would; returns its exit code.
        A supervised stack starts it again by itself."""
        p = self.procs[name]
        self._reap(p)
        return p.wait()

    def restart(self, name: str, health_timeout_s: float = 300.0) -> None:
        """Start one service again with its original config and wait until it is healthy."""
        with self._lock:
            if self.procs[name].poll() is None:
                self.kill(name)
            self._reap(self.procs[name])
            self._spawn(name)
        self.wait_healthy(name, health_timeout_s)

    def wait_healthy(self, name: str, timeout_s: float = 300.0) -> None:
        wait_healthy(self.addrs[name], timeout_s, None if self.spec.supervise else self.procs[name],
                     self.spec.run_dir / f"{name}.log")

    def write_state(self) -> None:
        state = {
            "broker": {"pid": self.broker.proc.pid, "bootstrap": self.broker.bootstrap},
            "services": {n: {"pid": p.pid, "grpc": self.addrs[n], "metrics": self.metrics_ports[n]}
                         for n, p in self.procs.items()},
            "weights": str(self.spec.run_dir / "weights"),
        }
        (self.spec.run_dir / "stack.json").write_text(json.dumps(state, indent=2))

    def stop(self, grace_s: float = 20.0) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(10)
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Also whatever the service started (a stop during start-up leaves no vLLM behind).
            self._reap(p)
            p.wait()
        self.procs.clear()
        if self.broker:
            self.broker.stop()

    def __enter__(self) -> "Stack":
        # `with Stack(spec).start() as st:` must not start a second stack beside the first
        # (the first would outlive the block).
        return self if self.procs else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def seed_prompts(bus: BusConfig, texts: list[str], n: int = 0, source: str = "seed") -> list[str]:
    """Produce prompts to rlhf.prompts; returns their ids."""
    from rlhf.events.v1 import events_pb2

    topic = Topics(bus.topic_prefix).prompts
    prod = Producer(bus, client_id="seeder")
    ids = []
    try:
        for t in texts:
            pid = uuid.uuid4().hex
            prod.send(topic, pid, events_pb2.Prompt(prompt_id=pid, text=t, n=n, source=source,
                                                     created_unix_ms=now_ms()), wait=False)
            ids.append(pid)
        prod.flush()
    finally:
        prod.close()
    return ids


def _down(run_dir: Path) -> None:
    state_file = run_dir / "stack.json"
    if not state_file.exists():
        print(f"no stack running from {run_dir}")
        return
    state = json.loads(state_file.read_text())
    pids = [v["pid"] for v in state["services"].values()]
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
                time.sleep(0.2)
            except ProcessLookupError:
                break
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.killpg(state["broker"]["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    state_file.unlink()
    print("stack stopped")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "seed"])
    ap.add_argument("--run-dir", default=".run", type=Path)
    ap.add_argument("--prompts", type=Path, help="seed: a text file with one prompt per line "
                                                 "(default: 32 prompts in the tiny model's vocabulary)")
    args = ap.parse_args(argv)
    if args.action == "down":
        _down(args.run_dir)
        return
    if args.action == "seed":
        state_file = args.run_dir / "stack.json"
        if not state_file.exists():
            sys.exit(f"no stack running from {args.run_dir}; start one with `make up`")
        from .models import tiny_prompts

        bus = BusConfig(bootstrap=json.loads(state_file.read_text())["broker"]["bootstrap"])
        texts = ([ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
                 if args.prompts else tiny_prompts(32, seed=int(time.time())))
        print(f"seeded {len(seed_prompts(bus, texts, source='cli'))} prompts into {Topics().prompts}")
        return
    if (args.run_dir / "stack.json").exists():
        sys.exit(f"a stack is already running from {args.run_dir} (see stack.json); run `make down` first")
    print("starting broker and services (the policy's vLLM engine takes about a minute on CPU)...", flush=True)
    st = Stack(StackSpec(run_dir=args.run_dir, default_ports=True)).start(detach=True, verbose=True)
    print(f"kafka     {st.bus.bootstrap}")
    for n in SERVICES:
        print(f"{n:<14} grpc {st.addrs[n]}  metrics http://127.0.0.1:{st.metrics_ports[n]}/metrics")
    print(f"logs in {args.run_dir}/*.log; send prompts with `make seed`; stop with `make down`")


if __name__ == "__main__":
    main()
