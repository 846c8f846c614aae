"""A BERT sequence classifier run on packed tokens: the scores of `model(**padded batch)`
without computing a single padding token in the dense layers.

On a CPU a forward pass costs what its tokens cost, padding included, plus a fixed cost per
pass (about 9 ms for MiniLM-L6 on one core). A dynamic batch holds the few requests in
flight, of whatever lengths they have, so padding them to the longest costs a great deal,
and splitting them into passes of similar length pays the fixed cost several times. Here
every item's tokens are laid end to end in one (tokens, hidden) matrix, so the embeddings,
projections and feed-forward layers run once over the real tokens only. Attention alone
needs the items apart: for it each group of items of similar length is padded (the
attention share of the cost is small at these lengths), and the outputs are gathered back.

Every step but attention is the model's own module (embeddings, output projections,
feed-forward, layer norms, pooler, classifier), called on the packed rows; nothing is copied
but the fused query/key/value projection of each layer, built once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def length_buckets(lengths: list[int], max_padding: float) -> list[list[int]]:
    """Indices grouped by length (shortest first) so that each group's padded size is at
    most (1 + max_padding) times its real token count."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]  # the longest so far, since the order is ascending
        if group and (len(group) + 1) * n > (1 + max_padding) * (real + n):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += n
    if group:
        groups.append(group)
    return groups


def supports(model) -> bool:
    """A BertForSequenceClassification (absolute positions) in eval mode. Other models keep
    the padded path."""
    cfg = getattr(model, "config", None)
    return (type(model).__name__ == "BertForSequenceClassification" and cfg is not None
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
            and not getattr(cfg, "is_decoder", False) and not model.training)


class PackedBert:
    """Scores of a BertForSequenceClassification on unpadded rows (blocking; no grad)."""

    def __init__(self, model, attention_padding: float = 0.25):
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a BERT sequence classifier this path runs")
        self.model = model
        self.layers = list(model.bert.encoder.layer)
        self.heads = model.config.num_attention_heads
        # Most padding accepted in one attention call, as a fraction of its real tokens.
        self.attention_padding = attention_padding
        self.qkv = []
        for layer in self.layers:
            s = layer.attention.self
            self.qkv.append((torch.cat([s.query.weight, s.key.weight, s.value.weight]).detach().contiguous(),
                             torch.cat([s.query.bias, s.key.bias, s.value.bias]).detach().contiguous()))

    @torch.inference_mode()
    def __call__(self, ids: list[list[int]], type_ids: list[list[int]] | None = None) -> list[float]:
        n = len(ids)
        if n == 0:
            return []
        lengths = [len(r) for r in ids]
        if min(lengths) < 1:
            raise ValueError("every row needs at least one token")
        # Packed in ascending length, so that a group of similar length is one slice.
        order = sorted(range(n), key=lengths.__getitem__)
        lens = torch.tensor([lengths[i] for i in order])
        starts = torch.cumsum(lens, 0) - lens
        total = int(lens.sum())
        flat_ids = torch.tensor([t for i in order for t in ids[i]])
        flat_types = (torch.tensor([t for i in order for t in type_ids[i]]) if type_ids is not None
                      else torch.zeros(total, dtype=torch.long))
        pos = torch.arange(total) - torch.repeat_interleave(starts, lens)
        bert = self.model.bert
        # One "row" of all the tokens, each item with its own positions and token types.
        x = bert.embeddings(input_ids=flat_ids[None], token_type_ids=flat_types[None], position_ids=pos[None])[0]
        groups = self._attention_groups([lengths[i] for i in order], starts)
        for layer, (w, b) in zip(self.layers, self.qkv):
            x = layer.attention.output(self._attention(F.linear(x, w, b), groups, total), x)
            x = layer.output(layer.intermediate(x), x)
        first = x[starts]
        pooled = bert.pooler(first[:, None]) if bert.pooler is not None else first
        sorted_scores = self.model.classifier(pooled)[:, 0].tolist()
        scores = [0.0] * n
        for k, i in enumerate(order):
            scores[i] = sorted_scores[k]
        return scores

    def _attention_groups(self, lengths: list[int], starts: torch.Tensor) -> list[tuple]:
        """Per group of similar length: (index of each padded slot into the packed rows, the
        key mask, the slots that hold real tokens). Padded slots point at an extra zero row."""
        total = sum(lengths)
        out = []
        for g in length_buckets(lengths, self.attention_padding):  # ascending, so contiguous
            lens = torch.tensor([lengths[i] for i in g])
            width = int(lens.max())
            slot = torch.arange(width)
            real = slot[None, :] < lens[:, None]
            index = torch.where(real, starts[g][:, None] + slot[None, :], torch.full_like(real, total, dtype=torch.long))
            out.append((index, real[:, None, None, :], real))
        return out

    def _attention(self, qkv: torch.Tensor, groups: list[tuple], total: int) -> torch.Tensor:
        hidden = qkv.shape[1] // 3
        d = hidden // self.heads
        padded_qkv = torch.cat([qkv, qkv.new_zeros(1, qkv.shape[1])])
        ctx = qkv.new_empty(total, hidden)
        for index, key_mask, real in groups:
            m, width = index.shape
            t = padded_qkv[index].view(m, width, 3, self.heads, d).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(t[0], t[1], t[2], attn_mask=key_mask)
            ctx[index[real]] = out.transpose(1, 2).reshape(m, width, hidden)[real]
        return ctx
