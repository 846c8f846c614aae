from __future__ import annotations

import torch


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Right-pad prompt+response sequences into a batch.

    Returns input_ids (B, L), attention_mask (B, L), and response_mask (B, L-1): the
    positions of the *shifted* targets (targets = input_ids[:, 1:]) that are response tokens.
    """
    lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(lens)
    B = len(prompts)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    resp_mask = torch.zeros((B, L - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[i, : len(seq)] = 1
        # target index t predicts input_ids[t+1]; response tokens sit at len(p) .. len(seq)-1
        resp_mask[i, len(p) - 1 : len(seq) - 1] = 1.0
    return input_ids, attn, resp_mask


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for each t: (B, L-1) from logits (B, L, V)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> list[list[float]]:
    """Per-token log-probs of each response under `model` (teacher forcing), unpadded."""
    input_ids, attn, resp_mask = pack_sequences(prompts, responses, pad_id)
    logits = model(input_ids=input_ids, attention_mask=attn).logits
    lp = token_logprobs(logits, input_ids)
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        out.append(lp[i, len(p) - 1 : len(p) - 1 + len(r)].tolist())
    return out
