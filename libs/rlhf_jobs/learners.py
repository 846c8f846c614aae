"""Learners of the offline jobs: DPO/IPO on preference pairs and SFT on demonstrations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rlhf_common.algos.dpo import preference_loss, sequence_logprob
from rlhf_common.algos.logprobs import pack_sequences, token_logprobs
from rlhf_common.algos.sft import sft_loss


@dataclass
class PreferenceBatch:
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    ref_chosen: list[float]  # reference sequence log-probs of the chosen responses, (B,)
    ref_rejected: list[float]


class PreferenceLearner:
    """DPO / IPO on preference pairs."""

    def __init__(self, model, lr: float, pad_id: int, beta: float = 0.1, kind: Literal["dpo", "ipo"] = "dpo",
                 max_grad_norm: float = 1.0):
        self.model, self.pad_id, self.beta, self.kind = model, pad_id, beta, kind
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

    def sequence_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        input_ids, attn, mask = pack_sequences(prompts, responses, self.pad_id)
        logp = token_logprobs(self.model(input_ids=input_ids, attention_mask=attn).logits, input_ids)
        return sequence_logprob(logp, mask)

    def step(self, batch: PreferenceBatch) -> dict:
        n = len(batch.prompts)
        both = self.sequence_logprobs(batch.prompts + batch.prompts, batch.chosen + batch.rejected)
        out = preference_loss(both[:n], both[n:], torch.tensor(batch.ref_chosen), torch.tensor(batch.ref_rejected),
                              beta=self.beta, kind=self.kind)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return {"loss": float(out.loss.detach()), "accuracy": float(out.accuracy),
                "chosen_reward": float(out.chosen_reward), "rejected_reward": float(out.rejected_reward)}


class SFTLearner:
    def __init__(self, model, lr: float, pad_id: int, max_grad_norm: float = 1.0):
        self.model, self.pad_id, self.max_grad_norm = model, pad_id, max_grad_norm
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(self, prompts: list[list[int]], responses: list[list[int]]) -> float:
        input_ids, attn, mask = pack_sequences(prompts, responses, self.pad_id)
        logp = token_logprobs(self.model(input_ids=input_ids, attention_mask=attn).logits, input_ids)
        loss = sft_loss(logp, mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return float(loss.detach())
