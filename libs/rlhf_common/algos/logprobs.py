from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class ResponseBatch:
    """Responses to score under a model, one row per sample; responses right-padded to the
    longest, R tokens. targets and mask are (B, R); mask is 1 on real response tokens.

    `response_forward` computes what the model predicts at exactly those positions:
    - the output head (and the log-softmax over the vocabulary) runs on response positions
      only, never on the prompts;
    - a prompt shared by several rows (the samples of one prompt's group) goes through the
      model once; its keys and values are handed to every row's response pass, and
      gradients flow back through them. The same function as one pass per row, for less work.
    """

    prompts: list[list[int]]
    responses: list[list[int]]
    pad_id: int
    targets: torch.Tensor
    mask: torch.Tensor

    @property
    def width(self) -> int:
        return self.targets.shape[1]

    def rows(self, values: list[list[float]]) -> torch.Tensor:
        """Per-response-token values (one list per sample) as a (B, R) float tensor, 0 beyond each response."""
        out = torch.zeros(self.mask.shape)
        for i, v in enumerate(values):
            out[i, :len(v)] = torch.tensor(list(v), dtype=torch.float32)
        return out

    def select(self, idx: torch.Tensor) -> "ResponseBatch":
        """The rows `idx` (a minibatch)."""
        rows = idx.tolist()
        return ResponseBatch([self.prompts[i] for i in rows], [self.responses[i] for i in rows], self.pad_id,
                             self.targets[idx], self.mask[idx])


def pack_responses(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> ResponseBatch:
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    R = max(1, max(len(r) for r in responses))
    targets = torch.full((len(prompts), R), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), R), dtype=torch.float32)
    for i, r in enumerate(responses):
        if r:
            targets[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, :len(r)] = 1.0
    return ResponseBatch([list(p) for p in prompts], [list(r) for r in responses], pad_id, targets, mask)


def _left_padded(prompts: list[list[int]], pad_id: int, extra: int = 0):
    """input_ids, attention_mask, position_ids (N, P + extra) with the prompts right-aligned
    at column P; position ids count each row's own tokens from 0."""
    P = max(len(p) for p in prompts)
    n = len(prompts)
    ids = torch.full((n, P + extra), pad_id, dtype=torch.long)
    attn = torch.zeros((n, P + extra), dtype=torch.long)
    pos = torch.zeros((n, P + extra), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        pos[i, P - len(p):P] = torch.arange(len(p))
    return ids, attn, pos, P


def response_forward(model, batch: ResponseBatch, output_hidden_states: bool = False):
    """Logits (B, R, V) at the positions that predict each response token, and the last
    hidden states (B, R, H) there when asked (else None). See ResponseBatch."""
    keys = [tuple(p) for p in batch.prompts]
    unique = list(dict.fromkeys(keys))
    R = batch.width
    if len(unique) == len(keys):  # nothing shared: one pass with every response in the same columns
        ids, attn, pos, P = _left_padded(batch.prompts, batch.pad_id, extra=R)
        for i, (p, r) in enumerate(zip(batch.prompts, batch.responses)):
            ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, P:P + len(r)] = 1
            pos[i, P:P + len(r)] = torch.arange(len(p), len(p) + len(r))
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=R + 1,
                    output_hidden_states=output_hidden_states)
        hidden = out.hidden_states[-1][:, P - 1:-1] if output_hidden_states else None
        return out.logits[:, :-1], hidden
    # Each distinct prompt once; its cache is then repeated for the rows that share it.
    row_of = {k: j for j, k in enumerate(unique)}
    owner = torch.tensor([row_of[k] for k in keys])
    ids, attn, pos, P = _left_padded([list(k) for k in unique], batch.pad_id)
    first = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                  output_hidden_states=output_hidden_states)
    cache = first.past_key_values
    cache.batch_select_indices(owner)
    resp = torch.full((len(keys), R), batch.pad_id, dtype=torch.long)
    resp_pos = torch.zeros((len(keys), R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(batch.prompts, batch.responses)):
        resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        resp_pos[i] = torch.arange(len(p), len(p) + R)
    out = model(input_ids=resp, attention_mask=torch.cat([attn[owner], batch.mask.long()], dim=1),
                position_ids=resp_pos, past_key_values=cache, use_cache=True, logits_to_keep=R,
                output_hidden_states=output_hidden_states)
    # Position j of the response pass predicts response token j + 1; token 0 is predicted
    # by the prompt's last position.
    logits = torch.cat([first.logits[owner], out.logits[:, :-1]], dim=1)
    hidden = (torch.cat([first.hidden_states[-1][owner, -1:], out.hidden_states[-1][:, :-1]], dim=1)
              if output_hidden_states else None)
    return logits, hidden


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log-softmax of logits (..., V) taken at targets (...), in float32 at least."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> list[list[float]]:
    """Per-token log-probs of each response under `model` (teacher forcing), unpadded."""
    batch = pack_responses(prompts, responses, pad_id)
    logits, _ = response_forward(model, batch)
    lp = gather_logprobs(logits, batch.targets)
    return [lp[i, :len(r)].tolist() for i, r in enumerate(responses)]
