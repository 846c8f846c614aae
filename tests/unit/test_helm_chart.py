"""The Helm chart (deploy/k8s/rlhf-stack), proven without a cluster.

Helm's own engine (Helm v4's Go SDK inside the helm-python-sdk wheel) lints and renders
the chart over every values file in its ci/ folder; every rendered object is checked
against the Kubernetes JSON schemas (kubernetes-validate); the alert rules go through
promtool (`check rules`, and `test rules` on made-up series), and every metric that an
alert or a dashboard names must be defined, with its labels, by a service's metrics class.
`make test` installs all three (the `$(VENV)/.helm` target)."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rlhf_common.config import BaseConfig, BusConfig, markdown_table
from rlhf_common.objstore import WeightCacheConfig
from rlhf_common.topics import Topics

from tests.helm_helpers import CHART, selectors

ROOT = Path(__file__).resolve().parents[2]
VALUES_FILES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "rl", "ml"
PREFIX = f"{RELEASE}-rlhf-stack"
SERVICES = ["policy", "reward", "reference", "trainer", "feedback", "reward_learner"]
# The ports each service listens on by default (README.md, "Configuration").
PORTS = {"policy": (50051, 9101, None), "reward": (50052, 9102, 8002), "reference": (50053, 9103, None),
         "trainer": (50054, 9104, None), "feedback": (50055, 9105, 8005), "reward_learner": (50056, 9106, None)}
KUBE_VERSION = "1.33.0"
# Custom resources: their API versions (their schemas are not in kubernetes-validate).
CUSTOM = {"ServiceMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
          "Kafka": "kafka.strimzi.io/v1beta2", "KafkaNodePool": "kafka.strimzi.io/v1beta2",
          "KafkaTopic": "kafka.strimzi.io/v1beta2", "KafkaUser": "kafka.strimzi.io/v1beta2",
          "ScaledObject": "keda.sh/v1alpha1"}
# The custom resources' CRD schemas, as JSON schemas (tests/schemas/README.md says where from).
# Strimzi's are not among them: no PyPI or npm package ships them as a schema.
SCHEMAS = ROOT / "tests" / "schemas"
CRD_SCHEMAS = {"ServiceMonitor": "monitoring.coreos.com_v1_ServiceMonitor.json",
               "PrometheusRule": "monitoring.coreos.com_v1_PrometheusRule.json",
               "ScaledObject": "keda.sh_v1alpha1_ScaledObject.json"}
# Metrics from outside the services: Prometheus' own and Strimzi's Kafka Exporter.
EXTERNAL_METRICS = {"up": set(), "kafka_consumergroup_lag": {"consumergroup", "topic", "partition"}}
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "container", "endpoint"}


def _load(name: str | None) -> dict | None:
    return yaml.safe_load((CHART / "ci" / name).read_text()) if name else None


@lru_cache(maxsize=None)
def _render_cached(key: str) -> tuple:
    values = json.loads(key)
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return tuple(d for path, text in sorted(out.items()) if path.endswith(".yaml")
                 for d in yaml.safe_load_all(text) if d)


def render(values: dict | None = None) -> list[dict]:
    return copy.deepcopy(list(_render_cached(json.dumps(values, sort_keys=True))))


def render_error(values: dict) -> str:
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return str(err.value)


def objects(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs) -> dict[str, dict]:
    """Component name (policy, reward_learner ...) -> its Deployment or StatefulSet."""
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            out[d["metadata"]["labels"]["app.kubernetes.io/component"].replace("-", "_")] = d
    return out


def container(w):
    (c,) = w["spec"]["template"]["spec"]["containers"]
    return c


def env_of(w) -> dict[str, dict]:
    return {e["name"]: e for e in container(w)["env"]}


# ---- Helm's engine: lint and render every values file ----------------------------------------

@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_helm_lint_is_clean(values_file):
    report = helm.lint(str(CHART), _load(values_file), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not problems and not report["errors"], problems or report["errors"]


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_every_rendered_object_passes_the_kubernetes_schemas(values_file):
    docs = render(_load(values_file))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "NetworkPolicy",
            "ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds
    for d in docs:
        if d["kind"] in CUSTOM:
            assert d["apiVersion"] == CUSTOM[d["kind"]], d["metadata"]["name"]
            assert isinstance(d["spec"], dict) and d["metadata"]["name"]
            if d["kind"] in CRD_SCHEMAS:
                validate_custom(d)
            continue
        # strict: unknown fields are errors too.
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    assert len(workloads(docs)) == len(SERVICES)


def _strict(schema):
    """A CRD schema made strict like kubernetes-validate's: an object with named properties
    takes no others (the API server would prune them silently)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[kind]).read_text())
    # metadata refers to Kubernetes' ObjectMeta, which the built-in objects' checks cover.
    schema["properties"]["metadata"] = {"type": "object"}
    schema = _strict(schema)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def validate_custom(doc: dict) -> None:
    errors = sorted(_crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{doc['kind']} {doc['metadata']['name']} at {list(e.absolute_path)}: {e.message}"
                        for e in errors]


def test_every_crd_schema_is_checked_somewhere():
    kinds = {d["kind"] for f in [None, *VALUES_FILES] for d in render(_load(f))}
    assert set(CRD_SCHEMAS) <= kinds


@pytest.mark.parametrize("kind,path,bad", [
    ("ServiceMonitor", ("spec", "endpoints", 0), {"intervall": "15s"}),
    ("ServiceMonitor", ("spec", "endpoints", 0), {"port": 9101}),
    ("PrometheusRule", ("spec", "groups", 0, "rules", 0), {"for": 15}),
    ("PrometheusRule", ("spec", "groups", 0), {"rulez": []}),
    ("ScaledObject", ("spec",), {"minReplicas": "two"}),
    ("ScaledObject", ("spec", "triggers", 0), {"metadatas": {}}),
])
def test_the_crd_schemas_catch_misspelt_fields_and_wrong_types(kind, path, bad):
    doc = next(d for d in render(_load("strimzi-values.yaml")) if d["kind"] == kind)
    validate_custom(doc)
    node = doc
    for key in path:
        node = node[key]
    node.update(bad)
    with pytest.raises(AssertionError, match=kind):
        validate_custom(doc)


def test_the_schema_check_does_catch_a_misspelt_field():
    w = copy.deepcopy(workloads(render())["policy"])
    container(w)["resources"]["limitz"] = {"cpu": "1"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(w, KUBE_VERSION, strict=True)


# ---- workloads -------------------------------------------------------------------------------

def test_gpu_pools_get_gpus_tolerations_and_affinity():
    docs = render(_load("gpu-values.yaml"))
    ws = workloads(docs)
    want = {"policy": 1, "trainer": 2, "reference": 1}
    for name, w in ws.items():
        spec = w["spec"]["template"]["spec"]
        res = container(w)["resources"]
        if name in want:
            assert res["limits"]["nvidia.com/gpu"] == want[name] == res["requests"]["nvidia.com/gpu"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert {"key": "pool", "operator": "Equal", "value": "rlhf-gpu", "effect": "NoSchedule"} in spec["tolerations"]
            assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
            terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == "cloud.google.com/gke-accelerator"
        else:
            assert "nvidia.com/gpu" not in res.get("limits", {}), name
            assert "tolerations" not in spec and "nodeSelector" not in spec, name
    assert ws["policy"]["spec"]["replicas"] == 2
    assert container(ws["policy"])["image"] == "rlhf-policy:0.1.0-gpu"
    assert env_of(ws["policy"])["RLHF_POLICY_MAX_MODEL_LEN"]["value"] == "4096"


def test_cpu_only_asks_for_no_gpu_anywhere():
    docs = render(_load("cpu-values.yaml"))
    text = yaml.safe_dump_all(docs)
    assert "nvidia.com/gpu" not in text
    ws = workloads(docs)
    assert container(ws["policy"])["image"] == "rlhf-policy:0.1.0-cpu"
    assert container(ws["reward_learner"])["image"] == "rlhf-reward-learner:0.1.0"


@pytest.mark.parametrize("values_file", [None, "existing-secrets-values.yaml"])
def test_pods_are_hardened_and_probed_over_grpc_health(values_file):
    tls = values_file is not None
    for name, w in workloads(render(_load(values_file))).items():
        spec = w["spec"]["template"]["spec"]
        c = container(w)
        assert spec["enableServiceLinks"] is False and spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        grpc_port, metrics_port, http_port = PORTS[name]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": grpc_port, "metrics": metrics_port, **({"http": http_port} if http_port else {})}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # kubelet's gRPC probes speak plaintext only; with TLS the probe is a TCP check.
            assert c[probe] .get("tcpSocket" if tls else "grpc") == ({"port": "grpc"} if tls else {"port": grpc_port})
        env = env_of(w)
        prefix = "RLHF_" + name.upper()
        assert env[f"{prefix}_HOST"]["value"] == "0.0.0.0"
        assert env[f"{prefix}_PORT"]["value"] == str(grpc_port)
        assert env[f"{prefix}_METRICS_PORT"]["value"] == str(metrics_port)
        assert (f"{prefix}_TLS_CERT_FILE" in env) == tls
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/home/rlhf/.cache"} <= mounts


def _setting_names() -> set[str]:
    configs = [BusConfig, WeightCacheConfig]
    for svc in SERVICES:
        mod = importlib.import_module(f"rlhf_{svc}.config")
        configs += [c for c in vars(mod).values() if isinstance(c, type) and issubclass(c, BaseConfig)
                    and c.__module__ == mod.__name__ and c.ENV]
    return set(re.findall(r"`(RLHF_[A-Z0-9_]+)`", markdown_table(configs)))


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_every_rlhf_variable_set_in_a_pod_is_a_real_setting(values_file):
    known = _setting_names()
    for name, w in workloads(render(_load(values_file))).items():
        c = container(w)
        names = {n for n in env_of(w) if n.startswith("RLHF_")}
        # The start scripts export one more: the feedback join's partitions.
        names |= set(re.findall(r"export (RLHF_[A-Z_]+)=", " ".join(c.get("args", []))))
        assert names <= known, (name, sorted(names - known))


def test_the_weight_store_is_one_rwx_claim_written_by_the_trainer_and_reward_learner_only():
    docs = render()
    (pvc,) = objects(docs, "PersistentVolumeClaim").values()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, w in workloads(docs).items():
        mounts = {m["name"]: m for m in container(w)["volumeMounts"]}
        vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        if name == "feedback":
            assert "weights" not in mounts
            continue
        assert mounts["weights"]["mountPath"] == "/weights"
        assert vols["weights"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert mounts["weights"]["readOnly"] is (name not in ("trainer", "reward_learner"))
        assert mounts["models"]["readOnly"] is True
    env = {n: env_of(w) for n, w in workloads(docs).items()}
    assert env["trainer"]["RLHF_TRAINER_WEIGHT_STORE"]["value"] == env["reward_learner"]["RLHF_REWARD_LEARNER_WEIGHT_STORE"]["value"]
    assert env["trainer"]["RLHF_TRAINER_REWARD_ADDR"]["value"] == f"{PREFIX}-reward:50052"
    assert env["trainer"]["RLHF_TRAINER_REFERENCE_ADDR"]["value"] == f"{PREFIX}-reference:50053"


WEIGHT_USERS = ("policy", "reward", "reference", "trainer", "reward_learner")


def test_an_object_storage_weight_store_needs_no_claim_and_takes_credentials_from_a_secret():
    values = _load("object-storage-values.yaml")
    docs = render(values)
    os_values = values["weightStore"]["objectStorage"]
    assert not objects(docs, "PersistentVolumeClaim"), "no weights claim with object storage"
    text = json.dumps(docs)
    for name, w in workloads(docs).items():
        c = container(w)
        env = env_of(w)
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        assert "weights" not in mounts and "weights" not in vols
        claims = {v["persistentVolumeClaim"]["claimName"] for v in vols.values() if "persistentVolumeClaim" in v}
        if name == "feedback":
            assert not {n for n in env if n.startswith("AWS_") or n.startswith("RLHF_WEIGHT")}
            assert "weight-cache" not in mounts
            continue
        assert claims == {"rlhf-models"} and mounts["models"]["readOnly"] is True  # the initial models, as before
        # The weight cache is a writable emptyDir where RLHF_WEIGHT_CACHE_DIR points (the root
        # filesystem is read-only), with the size limit asked for.
        assert mounts["weight-cache"]["mountPath"] == env["RLHF_WEIGHT_CACHE_DIR"]["value"]
        assert vols["weight-cache"]["emptyDir"] == {"sizeLimit": "50Gi"}
        assert env["RLHF_WEIGHT_CACHE_KEEP"]["value"] == "3"
        assert {"/tmp"} <= {m["mountPath"] for m in c["volumeMounts"]}  # the writers' staging space
        # Credentials only through secretKeyRef; region and endpoint as plain values.
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "rlhf-object-store", "key": key}}}
        assert env["AWS_REGION"]["value"] == "eu-west-1"
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000"
        prefix = "RLHF_" + name.upper()
        if name in ("trainer", "reward_learner"):
            assert env[f"{prefix}_WEIGHT_STORE"]["value"] == os_values["url"]
        else:
            assert f"{prefix}_WEIGHT_STORE" not in env
    assert "secretAccessKey" not in text and '"AWS_SECRET_ACCESS_KEY", "value"' not in text
    # Without credentialsSecret (workload identity) no key is injected.
    bare = render({**values, "weightStore": {"type": "objectStorage", "objectStorage": {"url": "s3://b/rlhf"}}})
    for name, w in workloads(bare).items():
        assert not {n for n in env_of(w) if n.startswith("AWS_")}, name
    # Egress to the store from the weight readers and writers only, on the ports and peers given.
    flows = _flows(docs)
    assert {(s, d, p) for s, d, p in flows if p == 9000} == {(s.replace("_", "-"), "other", 9000) for s in WEIGHT_USERS}
    assert not {f for f in _flows(bare) if f[0] == "feedback" and f[2] == 443}
    assert {(s, d, p) for s, d, p in _flows(bare) if p == 443} == {(s.replace("_", "-"), "any", 443)
                                                                   for s in WEIGHT_USERS}


def test_feedback_state_is_a_volume_per_replica():
    fb = workloads(render())["feedback"]
    assert fb["kind"] == "StatefulSet"
    (tpl,) = fb["spec"]["volumeClaimTemplates"]
    assert tpl["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert env_of(fb)["RLHF_FEEDBACK_STATE_DIR"]["value"] in {m["mountPath"] for m in container(fb)["volumeMounts"]
                                                              if m["name"] == tpl["metadata"]["name"]}


def _run_start_script(w, tmp_path, hostname: str) -> dict[str, str]:
    """Runs a pod's start script with a stand-in `python` that prints its environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text("#!/bin/sh\nenv\n")
    fake.chmod(0o755)
    c = container(w)
    assert c["command"] == ["/bin/sh", "-c"]
    out = subprocess.run(["/bin/sh", "-c", c["args"][0]], capture_output=True, text=True, check=True,
                         env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOSTNAME": hostname, "RLHF_POLICY_ROLLOUT_ENABLED": "true"})
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize("replicas,partitions", [(2, 6), (3, 4), (4, 4)])
def test_feedback_replicas_split_the_join_partitions(replicas, partitions, tmp_path):
    values = {"feedback": {"replicas": replicas},
              "kafka": {"topics": {"generations": {"partitions": partitions}, "feedback": {"partitions": partitions}}}}
    fb = workloads(render(values))["feedback"]
    shares = [_run_start_script(fb, tmp_path, f"{PREFIX}-feedback-{i}")["RLHF_FEEDBACK_JOIN_PARTITIONS"]
              for i in range(replicas)]
    got = [sorted(int(p) for p in s.split(",")) for s in shares]
    assert all(got), shares
    assert sorted(p for g in got for p in g) == list(range(partitions)), shares


@pytest.mark.parametrize("replicas,partitions", [(3, 6), (2, 3), (4, 3)])
def test_policy_replicas_split_the_prompt_partitions(replicas, partitions, tmp_path):
    pol = workloads(render({"policy": {"replicas": replicas},
                            "kafka": {"topics": {"prompts": {"partitions": partitions}}}}))["policy"]
    assert pol["kind"] == "StatefulSet"
    envs = [_run_start_script(pol, tmp_path, f"{PREFIX}-policy-{i}") for i in range(replicas)]
    got = [sorted(int(p) for p in e["RLHF_POLICY_ROLLOUT_PARTITIONS"].split(",") if p) for e in envs]
    # Every partition has exactly one rollout worker; a replica without a share only serves.
    assert sorted(p for g in got for p in g) == list(range(partitions)), got
    assert [e["RLHF_POLICY_ROLLOUT_ENABLED"] for e in envs] == ["true" if g else "false" for g in got]


def test_a_pdb_per_service():
    docs = render()
    pdbs = objects(docs, "PodDisruptionBudget")
    assert {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for p in pdbs.values()} == \
        {s.replace("_", "-") for s in SERVICES}


# ---- secrets ---------------------------------------------------------------------------------

SECRET_ENV = re.compile(r"(API_KEYS|PASSWORD)$")


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_secrets_reach_pods_only_through_secret_refs(values_file):
    docs = render(_load(values_file))
    for name, w in workloads(docs).items():
        for e in container(w)["env"]:
            if SECRET_ENV.search(e["name"]):
                assert "value" not in e and set(e["valueFrom"]) == {"secretKeyRef"}, (name, e)
    assert not objects(docs, "Secret"), "no Secret is made unless asked for"


def test_default_values_hold_no_secret():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["secrets"]["apiKeys"] == {"reward": "", "feedback": ""}
    assert values["kafka"]["security"]["sasl"]["passwordSecret"]["name"] == ""
    flat = json.dumps(values).lower()
    assert not re.search(r'"(password|token|apikey)"\s*:\s*"[^"]', flat)


def test_existing_secret_feeds_the_api_keys():
    ws = workloads(render(_load("existing-secrets-values.yaml")))
    for name, key in (("reward", "reward-api-keys"), ("feedback", "feedback-api-keys")):
        ref = env_of(ws[name])[f"RLHF_{name.upper()}_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "rlhf-api-keys", "key": key}
    for name in ("policy", "trainer", "reference", "reward_learner"):
        assert not any(n.endswith("API_KEYS") for n in env_of(ws[name]))
    trainer = env_of(ws["trainer"])
    assert trainer["RLHF_TRAINER_TLS_CA_FILE"]["value"] == "/etc/rlhf/tls/ca.crt"


def test_a_created_secret_holds_only_what_was_given_at_install():
    docs = render({"secrets": {"create": True, "apiKeys": {"reward": "k1,k2"}}})
    (secret,) = objects(docs, "Secret").values()
    import base64
    assert base64.b64decode(secret["data"]["reward-api-keys"]) == b"k1,k2"
    ref = env_of(workloads(docs)["reward"])["RLHF_REWARD_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]


# ---- Kafka -----------------------------------------------------------------------------------

def test_strimzi_topics_have_the_libraries_names_partitions_retention_and_compaction():
    docs = render()
    topics = {t["spec"]["topicName"]: t["spec"] for t in objects(docs, "KafkaTopic").values()}
    assert set(topics) == set(Topics("rlhf").all())
    compacted = {n for n, t in topics.items() if t["config"]["cleanup.policy"] == "compact"}
    assert compacted == Topics("rlhf").compacted() == {"rlhf.weights"}
    assert topics["rlhf.generations"]["partitions"] == topics["rlhf.feedback"]["partitions"]
    # Served answers outlive the feedback service's default join retention (7 days).
    assert topics["rlhf.generations"]["config"]["retention.ms"] > 604800 * 1000
    (kafka,) = objects(docs, "Kafka").values()
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    (pool,) = objects(docs, "KafkaNodePool").values()
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    assert all(t["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
               for t in objects(docs, "KafkaTopic").values())
    for w in workloads(docs).values():
        env = env_of(w)
        assert env["RLHF_KAFKA_BOOTSTRAP"]["value"] == f"{kafka['metadata']['name']}-kafka-bootstrap:9092"
        assert env["RLHF_KAFKA_SECURITY_PROTOCOL"]["value"] == "PLAINTEXT"


def test_strimzi_tls_listener_gives_every_client_scram_and_the_cluster_ca():
    docs = render(_load("strimzi-values.yaml"))
    (kafka,) = objects(docs, "Kafka").values()
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert listener["tls"] is True and listener["authentication"]["type"] == "scram-sha-512"
    (user,) = objects(docs, "KafkaUser").values()
    cluster = kafka["metadata"]["name"]
    for name, w in workloads(docs).items():
        env = env_of(w)
        assert env["RLHF_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
        assert env["RLHF_KAFKA_SASL_MECHANISM"]["value"] == "SCRAM-SHA-512"
        assert env["RLHF_KAFKA_SASL_USERNAME"]["value"] == user["metadata"]["name"]
        assert env["RLHF_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": user["metadata"]["name"], "key": "password"}
        vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        assert vols["kafka-ca"]["secret"]["secretName"] == f"{cluster}-cluster-ca-cert"
        assert env["RLHF_KAFKA_SSL_CAFILE"]["value"] == "/etc/rlhf/kafka-ca/ca.crt"


def test_external_kafka_settings_reach_every_client():
    docs = render(_load("external-kafka-values.yaml"))
    assert not [d for d in docs if d["apiVersion"].startswith("kafka.strimzi.io")]
    for name, w in workloads(docs).items():
        env = env_of(w)
        assert env["RLHF_KAFKA_BOOTSTRAP"]["value"] == "kafka-0.kafka.data.svc:9094,kafka-1.kafka.data.svc:9094"
        assert env["RLHF_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
        assert env["RLHF_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-kafka-credentials", "key": "password"}
        mounts = {m["name"]: m["mountPath"] for m in container(w)["volumeMounts"]}
        assert env["RLHF_KAFKA_SSL_CAFILE"]["value"].startswith(mounts["kafka-ca"])
        assert env["RLHF_KAFKA_SSL_CERTFILE"]["value"] == mounts["kafka-client"] + "/tls.crt"
        assert env["RLHF_KAFKA_SSL_KEYFILE"]["value"] == mounts["kafka-client"] + "/tls.key"


# ---- NetworkPolicies -------------------------------------------------------------------------

def _flows(docs) -> set[tuple[str, str, int]]:
    """(from, to, port) allowed by the NetworkPolicies, with 'any', 'kafka', 'dns' and
    'prometheus' for peers outside the chart's pods. A flow between two of the chart's pods
    needs both the sender's egress and the receiver's ingress."""
    pols = {p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: p["spec"]
            for p in objects(docs, "NetworkPolicy").values()}
    comps = set(pols)

    def peer(p) -> str:
        if "podSelector" in p and "namespaceSelector" not in p:
            labels = p["podSelector"].get("matchLabels", {})
            if "app.kubernetes.io/component" in labels:
                return labels["app.kubernetes.io/component"]
            if "strimzi.io/cluster" in labels:
                return "kafka"
        if p.get("podSelector", {}).get("matchLabels", {}).get("k8s-app") == "kube-dns":
            return "dns"
        if p.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == "monitoring":
            return "prometheus"
        return "other"

    ingress, egress = set(), set()
    for comp, spec in pols.items():
        assert set(spec["policyTypes"]) == {"Ingress", "Egress"}, comp
        for rule in spec.get("ingress", []):
            for port in rule["ports"]:
                for src in [peer(p) for p in rule.get("from", [])] or ["any"]:
                    ingress.add((src, comp, port["port"]))
        for rule in spec.get("egress", []):
            for port in rule["ports"]:
                for dst in [peer(p) for p in rule.get("to", [])] or ["any"]:
                    egress.add((comp, dst, port["port"]))
    flows = {(s, d, p) for s, d, p in ingress if s not in comps}
    for src, dst, port in egress:
        if dst not in comps:
            flows.add((src, dst, port))
        elif (src, dst, port) in ingress or ("any", dst, port) in ingress:
            flows.add((src, dst, port))
    # A pod-to-pod flow named on one side only is not a flow.
    flows |= {(s, d, p) for s, d, p in ingress if s in comps and (s, d, p) in egress}
    return flows


def test_network_policies_allow_exactly_the_architectures_flows():
    flows = _flows(render())
    comps = [s.replace("_", "-") for s in SERVICES]
    expected = set()
    for s in SERVICES:
        c = s.replace("_", "-")
        grpc_port, metrics_port, http_port = PORTS[s]
        expected |= {("prometheus", c, metrics_port), (c, "kafka", 9092), (c, "dns", 53)}
        if s in ("policy", "reward", "feedback"):  # the production APIs
            expected |= {("any", c, grpc_port)} | ({("any", c, http_port)} if http_port else set())
    expected |= {("trainer", "reward", 50052), ("trainer", "reference", 50053)}
    assert flows == expected, (sorted(flows - expected), sorted(expected - flows))
    assert not {f for f in flows if f[0] in comps and f[1] in comps and f[0] != "trainer"}


def test_network_policies_narrow_to_the_named_clients_and_brokers():
    flows = _flows(render(_load("external-kafka-values.yaml")))
    assert not {f for f in flows if f[0] == "any"}, "apiClients replace 'any pod'"
    assert ("other", "reward", 8002) in flows and ("trainer", "reward", 50052) in flows
    assert {(s, d, p) for s, d, p in flows if p == 9094} == {(s.replace("_", "-"), "other", 9094) for s in SERVICES}
    strimzi = render(_load("strimzi-values.yaml"))
    assert {f for f in _flows(strimzi) if f[1] == "kafka"} == {(s.replace("_", "-"), "kafka", 9093) for s in SERVICES}


# ---- values.schema.json and the chart's own checks ----------------------------------------

@pytest.mark.parametrize("values,message", [
    ({"policy": {"replicas": -1}}, "at '/policy/replicas': minimum: got -1, want 0"),
    ({"trainer": {"replicas": 2}}, "at '/trainer/replicas': maximum: got 2, want 1"),
    ({"reward": {"gpus": "one"}}, "at '/reward/gpus': got string, want integer"),
    ({"policy": {"variant": "tpu"}}, "at '/policy/variant'"),
    ({"policy": {"replicaz": 1}}, "additional properties 'replicaz' not allowed"),
    ({"kafka": {"mode": "zookeeper"}}, "at '/kafka/mode'"),
    ({"kafka": {"external": {"bootstrap": "no-port"}}}, "at '/kafka/external/bootstrap'"),
    ({"kafka": {"topics": {"prompts": {"partitions": 0}}}}, "at '/kafka/topics/prompts/partitions': minimum: got 0, want 1"),
    ({"kafka": {"security": {"protocol": "SASL_TLS"}}}, "at '/kafka/security/protocol'"),
    ({"weightStore": {"pvc": {"accessModes": ["ReadWriteOnce"]}}}, "at '/weightStore/pvc/accessModes'"),
    ({"weightStore": {"objectStorage": {"url": "s3://key:secret@bucket/rlhf"}}}, "at '/weightStore/objectStorage/url'"),
    ({"weightStore": {"objectStorage": {"cacheKeep": 0}}}, "at '/weightStore/objectStorage/cacheKeep'"),
    # Object-storage credentials never go in a component's env: only RLHF_* names are taken there.
    ({"trainer": {"env": {"AWS_SECRET_ACCESS_KEY": "k"}}}, "'AWS_SECRET_ACCESS_KEY' does not match pattern"),
    ({"containerSecurityContext": {"readOnlyRootFilesystem": False}}, "at '/containerSecurityContext/readOnlyRootFilesystem'"),
    ({"reward": {"podDisruptionBudget": {"maxUnavailable": 1, "minAvailable": 1}}}, "at '/reward/podDisruptionBudget'"),
    ({"reward": {"resources": {"limits": {"memory": "lots"}}}}, "at '/reward/resources/limits/memory'"),
    ({"monitoring": {"prometheusRule": {"klFor": "15 minutes"}}}, "at '/monitoring/prometheusRule/klFor'"),
])
def test_the_schema_refuses_bad_values_and_says_where(values, message):
    err = render_error(values)
    assert "don't meet the specifications of the schema" in err and message in err, err


@pytest.mark.parametrize("values,message", [
    ({"weightStore": {"type": "objectStorage", "objectStorage": {"credentialsSecret": "s3"}}},
     "weightStore.type=objectStorage needs weightStore.objectStorage.url"),
    ({"weightStore": {"type": "objectStorage", "objectStorage": {"url": "s3://bucket/rlhf"}}},
     "weightStore.type=objectStorage makes no weights claim, so the initial models need their own"),
    ({"kafka": {"mode": "external"}}, "kafka.mode=external needs kafka.external.bootstrap"),
    ({"kafka": {"mode": "external", "external": {"bootstrap": "k:9092"}, "security": {"protocol": "SASL_SSL"}}},
     "needs kafka.security.sasl.mechanism, .username and .passwordSecret.name"),
    ({"tls": {"enabled": True}}, "tls.enabled=true needs tls.secretName"),
    ({"kafka": {"topics": {"feedback": {"partitions": 3}}}}, "must be equal: the feedback join reads partition i of both"),
    ({"feedback": {"replicas": 8}}, "feedback.replicas (8) is more than kafka.topics.generations.partitions (6)"),
    ({"reward": {"env": {"RLHF_REWARD_API_KEYS": "k"}}}, "reward.env.RLHF_REWARD_API_KEYS: secrets never go in values"),
    ({"secrets": {"create": True, "existingSecret": "s"}}, "secrets.create and secrets.existingSecret exclude each other"),
    ({"reward": {"autoscaling": {"keda": {"enabled": True}}}}, "exclude each other: KEDA makes its own HPA"),
])
def test_the_chart_refuses_what_the_services_cannot_do(values, message):
    err = render_error(values)
    assert message in err, err


# ---- scaling ---------------------------------------------------------------------------------

def test_reward_scales_with_an_hpa_behind_its_service():
    docs = render()
    reward = workloads(docs)["reward"]
    assert "replicas" not in reward["spec"], "the HPA owns the replica count"
    (hpa,) = objects(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": reward["metadata"]["name"]}
    svc = objects(docs, "Service")[reward["metadata"]["name"]]
    assert svc["spec"]["selector"] == reward["spec"]["selector"]["matchLabels"]
    assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "metrics", "http"}


def test_keda_scales_reward_on_the_trainers_rollout_lag():
    docs = render(_load("strimzi-values.yaml"))
    assert not objects(docs, "HorizontalPodAutoscaler")
    (so,) = objects(docs, "ScaledObject").values()
    assert so["spec"]["scaleTargetRef"]["name"] == f"{PREFIX}-reward"
    prom = next(t for t in so["spec"]["triggers"] if t["type"] == "prometheus")
    assert 'consumergroup="rlhf-trainer"' in prom["metadata"]["query"] and 'topic="rlhf.rollouts"' in prom["metadata"]["query"]
    _check_promql(prom["metadata"]["query"], _known_metrics())


# ---- monitoring: promtool and the services' metrics ---------------------------------------

def test_selectors_finds_metrics_and_their_labels():
    got = selectors('sum by (le) (rate(a_bucket{x="1", y=~"b|c"}[5m])) / on() b_total - 3 and c > 0.5')
    assert got == [("a_bucket", ["x", "y"]), ("b_total", []), ("c", [])]


@lru_cache(maxsize=None)
def _known_metrics() -> dict[str, set[str]]:
    """Every series name the services export, with its labels, from their metrics classes."""
    known = {k: set(v) for k, v in EXTERNAL_METRICS.items()}
    for svc in SERVICES:
        mod = importlib.import_module(f"rlhf_{svc}.metrics")
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__:
                continue
            registry = CollectorRegistry()
            cls(registry)
            for collector in registry._collector_to_names:
                base, labels = collector._name, set(collector._labelnames)
                if isinstance(collector, Counter):
                    known[base + "_total"] = labels
                elif isinstance(collector, Histogram):
                    known[base + "_bucket"] = labels | {"le"}
                    known[base + "_count"] = labels
                    # prometheus_client leaves out _sum when a bucket bound is negative.
                    if collector._upper_bounds[0] >= 0:
                        known[base + "_sum"] = labels
                elif isinstance(collector, Gauge):
                    known[base] = labels
    return known


def _check_promql(expr: str, known: dict[str, set[str]]) -> set[str]:
    names = set()
    for name, labels in selectors(expr):
        assert name in known, f"{name} is defined by no service's metrics.py: {expr}"
        assert set(labels) <= known[name] | TARGET_LABELS, (name, labels, expr)
        names.add(name)
    assert names, expr
    return names


def _rules(docs) -> list[dict]:
    (rule,) = objects(docs, "PrometheusRule").values()
    return rule["spec"]["groups"]


def test_every_alert_names_only_metrics_that_exist():
    known = _known_metrics()
    groups = _rules(render())
    alerts = {r["alert"]: _check_promql(r["expr"], known) for g in groups for r in g["rules"]}
    # The issue's list: KL, reward hacking (length and proxy-gold gap), version lag of
    # rollouts, consumer lag, no weight update, reward API errors and latency, dead letters.
    assert {"RLHFKLAboveTarget", "RLHFRewardHackingLength", "RLHFRewardHackingProxyGap", "RLHFRolloutVersionLag",
            "RLHFConsumerLag", "RLHFNoWeightUpdate", "RLHFRewardApiErrors", "RLHFRewardApiLatency",
            "RLHFFeedbackDeadLetters"} <= set(alerts)
    assert "rlhf_trainer_kl_nats" in alerts["RLHFKLAboveTarget"]
    assert {"rlhf_trainer_reward_mean", "rlhf_trainer_response_length_mean"} <= alerts["RLHFRewardHackingLength"]
    assert "rlhf_reward_shadow_diff_bucket" in alerts["RLHFRewardHackingProxyGap"]
    assert "rlhf_trainer_rollout_version_lag_bucket" in alerts["RLHFRolloutVersionLag"]
    assert "rlhf_feedback_join_total" in alerts["RLHFFeedbackDeadLetters"]


def test_dashboards_are_sidecar_configmaps_whose_queries_name_real_metrics():
    known = _known_metrics()
    maps = [m for m in objects(render(), "ConfigMap").values() if m["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(maps) == len(list((CHART / "dashboards").glob("*.json"))) >= 2
    titles, metrics = set(), set()
    for m in maps:
        (text,) = m["data"].values()
        dash = json.loads(text)
        assert dash["uid"] and dash["panels"]
        for p in dash["panels"]:
            titles.add(p["title"].lower())
            for t in p["targets"]:
                metrics |= _check_promql(t["expr"], known)
    for word in ("reward", "kl", "entropy", "throughput", "lags", "weight sync", "feedback"):
        assert any(word in t for t in titles), word
    assert {"rlhf_policy_weight_sync_seconds_bucket", "rlhf_trainer_entropy_nats", "rlhf_feedback_join_total",
            "kafka_consumergroup_lag"} <= metrics


def test_a_servicemonitor_scrapes_every_services_metrics_port():
    docs = render()
    services = objects(docs, "Service")
    for sm in objects(docs, "ServiceMonitor").values():
        sel = sm["spec"]["selector"]["matchLabels"]
        (svc,) = [s for s in services.values() if sel.items() <= s["metadata"]["labels"].items()]
        assert sm["spec"]["endpoints"][0]["port"] == "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    assert len(objects(docs, "ServiceMonitor")) == len(SERVICES)


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make .venv/.helm` installs Debian's prometheus package")
    return path


def test_promtool_accepts_every_rule(promtool, tmp_path):
    for values_file in (None, "external-kafka-values.yaml"):
        groups = _rules(render(_load(values_file)))
        path = tmp_path / "rules.yaml"
        path.write_text(yaml.safe_dump({"groups": groups}))
        out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        n = sum(len(g["rules"]) for g in groups)
        assert out.returncode == 0 and f"SUCCESS: {n} rules found" in out.stdout, out.stdout + out.stderr


def test_alerts_fire_on_made_up_series_and_stay_quiet_otherwise(promtool, tmp_path):
    """promtool's rule unit tests: each alert fires on series that should trip it and not on
    healthy ones (annotations are left out; they are text)."""
    groups = _rules(render())
    for g in groups:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    ns = f'namespace="{NAMESPACE}"'
    tests = [{
        "interval": "1m",
        "input_series": [
            {"series": f'rlhf_trainer_kl_nats{{{ns}, pod="t"}}', "values": "0.05x10 0.4x50"},
            {"series": f'rlhf_trainer_reward_mean{{{ns}, pod="t"}}', "values": "0+0.01x150"},
            {"series": f'rlhf_trainer_response_length_mean{{{ns}, pod="t"}}', "values": "20+1x150"},
            {"series": f'rlhf_trainer_published_version{{{ns}, pod="t"}}', "values": "3x60"},
            {"series": f'rlhf_feedback_join_total{{{ns}, pod="f", kind="thumbs", outcome="joined"}}', "values": "0+10x60"},
            {"series": f'rlhf_feedback_join_total{{{ns}, pod="f", kind="thumbs", outcome="orphan"}}', "values": "0+2x60"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "RLHFKLAboveTarget", "exp_alerts": []},
            {"eval_time": "40m", "alertname": "RLHFKLAboveTarget",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE}}]},
            {"eval_time": "20m", "alertname": "RLHFRewardHackingLength", "exp_alerts": []},
            {"eval_time": "120m", "alertname": "RLHFRewardHackingLength",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE, "pod": "t"}}]},
            {"eval_time": "20m", "alertname": "RLHFNoWeightUpdate", "exp_alerts": []},
            {"eval_time": "45m", "alertname": "RLHFNoWeightUpdate",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE, "pod": "t"}}]},
            {"eval_time": "10m", "alertname": "RLHFFeedbackDeadLetters", "exp_alerts": []},
            {"eval_time": "45m", "alertname": "RLHFFeedbackDeadLetters",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": NAMESPACE}}]},
        ],
    }, {
        # Healthy: reward rises, length flat, KL low, weights published, no dead letters.
        "interval": "1m",
        "input_series": [
            {"series": f'rlhf_trainer_kl_nats{{{ns}, pod="t"}}', "values": "0.02x150"},
            {"series": f'rlhf_trainer_reward_mean{{{ns}, pod="t"}}', "values": "0+0.01x150"},
            {"series": f'rlhf_trainer_response_length_mean{{{ns}, pod="t"}}', "values": "20x150"},
            {"series": f'rlhf_trainer_published_version{{{ns}, pod="t"}}', "values": "1+1x150"},
            {"series": f'rlhf_feedback_join_total{{{ns}, pod="f", kind="thumbs", outcome="joined"}}', "values": "0+10x150"},
        ],
        "alert_rule_test": [{"eval_time": "140m", "alertname": a, "exp_alerts": []} for a in
                            ("RLHFKLAboveTarget", "RLHFRewardHackingLength", "RLHFNoWeightUpdate", "RLHFFeedbackDeadLetters")],
    }]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                          "tests": tests}))
    out = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "SUCCESS" in out.stdout + out.stderr, out.stdout + out.stderr


# ---- the image -------------------------------------------------------------------------------

def test_the_image_carries_the_rest_front_and_exposes_every_port():
    text = (ROOT / "deploy" / "k8s" / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(\S+)", text, re.M)
    assert "libs/rlhf_http" in copies and "libs/rlhf_common" in copies
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert {p for ports in PORTS.values() for p in ports if p} <= exposed
    assert re.search(r"^USER 10001$", text, re.M), "the pods run as uid 10001 (podSecurityContext.runAsUser)"
    assert os.path.isdir(ROOT / "libs" / "rlhf_http")
