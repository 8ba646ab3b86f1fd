"""Instruction prompts for a chat LLM and classification by label-word log-likelihood.

A text is classified by the log-likelihood the model gives each class's answer word right after
the chat prompt (``sum_j log p(word_j | prompt, word_<j)``): no sampling, so accuracy is exact.
Training is instruction following on the same prompts: next-token cross-entropy on the answer
word's tokens only. Both read the language-model head only at the positions that predict an
answer token (the head over every position would cost more than the whole decoder here).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spdecay.experiments.data import clip_texts
from spdecay.experiments.errors import RunnerError

_SENTINEL = "\u2063TEXT\u2063"  # an invisible separator no real text contains
MIN_TEXT_TOKENS = 8


@dataclass(frozen=True)
class PromptFormat:
    """``instruction`` goes in the system message (a short one replaces the template's default
    system prompt and saves tokens), the text is the user message, and the answer is
    ``labels[class_index]``."""

    instruction: str
    labels: tuple[str, ...]


def chat_prompt(tokenizer, fmt: PromptFormat, text: str) -> str:
    """The chat-template rendering of the prompt, ending where the assistant's answer starts."""
    messages = [{"role": "system", "content": fmt.instruction}, {"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class PromptEncoder:
    """Token ids of prompts of one format, each at most ``max_length`` tokens *with* the longest
    answer word: the text (not the instruction) is cut to fit."""

    def __init__(self, tokenizer, fmt: PromptFormat, max_length: int) -> None:
        rendered = chat_prompt(tokenizer, fmt, _SENTINEL)
        if rendered.count(_SENTINEL) != 1:
            raise RunnerError("the tokenizer's chat template does not place the user message verbatim")
        prefix, suffix = rendered.split(_SENTINEL)
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.prefix = self._ids(prefix)
        self.suffix = self._ids(suffix)
        self.label_ids = [self._ids(word) for word in fmt.labels]
        if any(not ids for ids in self.label_ids):
            raise RunnerError(f"a label word of {fmt.labels} encodes to no tokens")
        self.max_length = max_length
        self.text_budget = max_length - len(self.prefix) - len(self.suffix) - max(map(len, self.label_ids))
        if self.text_budget < MIN_TEXT_TOKENS:
            raise RunnerError(
                f"--max-length {max_length}: the prompt's instruction and chat markup take "
                f"{max_length - self.text_budget} tokens, leaving {self.text_budget} for the text "
                f"(need at least {MIN_TEXT_TOKENS})"
            )

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        return self.encode_all([text])[0]

    def encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        body = self.tokenizer(clip_texts(texts, self.text_budget), add_special_tokens=False)["input_ids"]
        return [self.prefix + list(ids)[: self.text_budget] + self.suffix for ids in body]


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder returning hidden states, LM head) of a causal LM, PEFT-wrapped or not (LoRA
    layers are injected into the decoder in place, so they take part)."""
    core = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    decoder = core.get_decoder() if callable(getattr(core, "get_decoder", None)) else None
    head = core.get_output_embeddings() if callable(getattr(core, "get_output_embeddings", None)) else None
    if decoder is None or head is None:
        raise RunnerError(f"{type(core).__name__} is not a causal language model with a decoder and an LM head")
    return decoder, head


def next_token_logits(
    model: nn.Module, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], pad_id: int
) -> tuple[Tensor, Tensor]:
    """Logits and last hidden states at ``positions[i]`` of ``sequences[i]`` (the positions'
    predictions of the *next* token), flattened in order: shapes (sum of counts, V) and (.., H).

    Right padding with an attention mask: causal attention never looks at later (pad) tokens,
    so every real position sees exactly its unpadded context and position ids.
    """
    decoder, head = causal_lm_parts(model)
    device = head.weight.device
    ids, mask = _padded(sequences, pad_id, left=False)
    rows = torch.tensor([i for i, pos in enumerate(positions) for _ in pos], dtype=torch.long)
    cols = torch.tensor([p for pos in positions for p in pos], dtype=torch.long)
    hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    picked = hidden[rows.to(device), cols.to(device)]
    return head(picked), picked


def _cache_argument(decoder: nn.Module, cache) -> dict:
    # transformers renamed ``past_key_values`` to ``cache`` (deprecated from 5.2x, removed in 5.40)
    params = inspect.signature(decoder.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def _padded(sequences: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[i, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def label_log_likelihoods(
    model: nn.Module, prompts: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]], pad_id: int,
    *, with_features: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """(B, C): ``log p(label_c | prompt_b)`` summed over the label's tokens.

    One decoder pass over the prompts; every label's first token is read off the prompt's last
    position. Longer labels continue from the prompts' key/value cache (each prompt's cache
    repeated once per label), so a prompt is never run twice. Prompts are left-padded for that
    (rotary position embeddings depend only on relative positions, and pads are masked).
    ``with_features`` also returns the hidden state at each prompt's last position (B, H), the
    frozen-probe features.
    """
    decoder, head = causal_lm_parts(model)
    device = head.weight.device
    n_prompts, n_classes = len(prompts), len(label_ids)
    ids, mask = _padded(prompts, pad_id, left=True)
    multi = any(len(label) > 1 for label in label_ids)
    out = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=multi)
    last = out.last_hidden_state[:, -1]
    logp_first = torch.log_softmax(head(last).float(), dim=-1)
    first = torch.tensor([label[0] for label in label_ids], device=device)
    scores = logp_first[:, first]  # (B, C)
    if multi:
        rest = [list(label[1:]) for label in label_ids]
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.batch_repeat_interleave(n_classes)  # row b * C + c: prompt b, label c
        cand, cand_mask = _padded([label for _ in range(n_prompts) for label in label_ids], pad_id, left=False)
        width = ids.shape[1]
        full_mask = torch.cat([mask.repeat_interleave(n_classes, 0), cand_mask], dim=1)
        positions = (width + torch.arange(cand.shape[1]))[None].expand(cand.shape[0], -1)
        hidden = decoder(input_ids=cand.to(device), attention_mask=full_mask.to(device),
                         position_ids=positions.to(device), **_cache_argument(decoder, cache)).last_hidden_state
        rows = [(b * n_classes + c, j) for b in range(n_prompts) for c in range(n_classes) for j in range(len(rest[c]))]
        if rows:
            r = torch.tensor([x[0] for x in rows], device=device)
            j = torch.tensor([x[1] for x in rows], device=device)
            targets = torch.tensor([rest[c][jj] for _ in range(n_prompts) for c in range(n_classes)
                                    for jj in range(len(rest[c]))], device=device)
            token_lp = torch.log_softmax(head(hidden[r, j]).float(), dim=-1).gather(1, targets[:, None])[:, 0]
            extra = torch.zeros(n_prompts * n_classes, device=device).index_add_(0, r, token_lp)
            scores = scores + extra.view(n_prompts, n_classes)
    return (scores, last) if with_features else scores


def answer_loss(
    model: nn.Module, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
) -> tuple[Tensor, Tensor]:
    """Instruction-following loss: mean next-token cross-entropy over the answer tokens (the
    prompt is context only). Returns (loss, token accuracy of greedy prediction)."""
    seqs = [list(p) + list(a) for p, a in zip(prompts, answers, strict=True)]
    positions = [list(range(len(p) - 1, len(p) - 1 + len(a))) for p, a in zip(prompts, answers, strict=True)]
    logits, _ = next_token_logits(model, seqs, positions, pad_id)
    targets = torch.tensor([t for a in answers for t in a], device=logits.device)
    loss = F.cross_entropy(logits.float(), targets)
    return loss, (logits.argmax(-1) == targets).float().mean()
