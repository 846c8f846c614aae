"""Tokenization that serving and training must do the same way."""

from __future__ import annotations


def pad_id(tokenizer) -> int:
    """The padding token id; tokenizers without one pad with end-of-sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a padding token its end-of-sequence token as one."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int, padded: bool = False):
    """Tokenize (prompt, response) pairs the one way both reward serving and reward-model
    training do.

    Pair encoding: BERT-style models get [CLS] p [SEP] r [SEP]; decoder models a plain
    join. Returns the encodings (truncated to max_length, longest part first; with `padded`,
    a padded batch of tensors) and, per pair, whether it was truncated.
    """
    full = tokenizer(prompts, responses)["input_ids"]
    enc = tokenizer(prompts, responses, truncation="longest_first", max_length=max_length)
    if padded:
        enc = tokenizer.pad(enc, return_tensors="pt")
    return enc, [len(ids) > max_length for ids in full]
