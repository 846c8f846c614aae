"""In-process sampling with transformers, for the learning tests and offline evaluation.

The services sample with vLLM; this is the same contract (response token ids plus the
sampler's per-token log-probs on raw logits) from a transformers model, so algorithms can
be exercised and evaluated without starting an engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .algos.logprobs import response_logprobs


@dataclass
class Samples:
    prompts: list[list[int]]  # one per sample (a prompt repeated n times)
    responses: list[list[int]]
    logprobs: list[list[float]]  # log pi(response[t] | prefix), raw logits
    group_ids: list[str]


@torch.no_grad()
def sample(model, prompts: list[list[int]], n: int, max_new_tokens: int, eos_id: int | None, pad_id: int,
           temperature: float = 1.0, seed: int | None = None) -> Samples:
    """Draw n samples per prompt (left-padded batched generation), cut at the first EOS."""
    if seed is not None:
        torch.manual_seed(seed)
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        attn[i, L - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature, top_k=0,
                         top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad_id,
                         eos_token_id=eos_id)
    gen = out[:, L:].tolist()
    rep_prompts, responses, groups = [], [], []
    for j, toks in enumerate(gen):
        i = j // n
        if eos_id is not None and eos_id in toks:
            toks = toks[: toks.index(eos_id) + 1]
        if not toks:
            continue
        rep_prompts.append(list(prompts[i]))
        responses.append(toks)
        groups.append(str(i))
    lps = response_logprobs(model, rep_prompts, responses, pad_id)
    return Samples(rep_prompts, responses, lps, groups)
