"""Instruction prompts for a chat LLM and classification by label-word log-likelihood.

A text is classified by the log-likelihood the model gives each class's answer word right after
the chat prompt (``sum_j log p(word_j | prompt, word_<j)``): no sampling, so accuracy is exact.
Training is instruction following on the same prompts: next-token cross-entropy on the answer
word's tokens only. Both read the language-model head only at the positions that predict an
answer token (the head over every position would cost more than the whole decoder here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        return self.prefix + self._ids(text)[: self.text_budget] + self.suffix

    def encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        body = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
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
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    rows = torch.tensor([i for i, pos in enumerate(positions) for _ in pos], dtype=torch.long)
    cols = torch.tensor([p for pos in positions for p in pos], dtype=torch.long)
    hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    picked = hidden[rows.to(device), cols.to(device)]
    return head(picked), picked


def _candidate_sequences(prompts, label_ids):
    seqs, positions, targets = [], [], []
    for prompt in prompts:
        for label in label_ids:
            seqs.append(list(prompt) + list(label))
            start = len(prompt) - 1  # the prompt's last token predicts the label's first
            positions.append(list(range(start, start + len(label))))
            targets.append(list(label))
    return seqs, positions, targets


def label_log_likelihoods(
    model: nn.Module, prompts: Sequence[Sequence[int]], label_ids: Sequence[Sequence[int]], pad_id: int,
    *, with_features: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """(B, C): ``log p(label_c | prompt_b)`` summed over the label's tokens.

    Single-token labels need one forward pass per prompt (all classes are read off the last
    position); otherwise each (prompt, label) pair is one sequence. ``with_features`` also
    returns the hidden state at each prompt's last position (B, H), the frozen-probe features.
    """
    n_classes = len(label_ids)
    if all(len(label) == 1 for label in label_ids):
        logits, hidden = next_token_logits(model, prompts, [[len(p) - 1] for p in prompts], pad_id)
        first = torch.tensor([label[0] for label in label_ids], device=logits.device)
        scores = torch.log_softmax(logits.float(), dim=-1)[:, first]
        return (scores, hidden) if with_features else scores
    seqs, positions, targets = _candidate_sequences(prompts, label_ids)
    logits, hidden = next_token_logits(model, seqs, positions, pad_id)
    flat_targets = torch.tensor([t for ts in targets for t in ts], device=logits.device)
    token_lp = torch.log_softmax(logits.float(), dim=-1).gather(1, flat_targets[:, None])[:, 0]
    owner = torch.tensor([i for i, ts in enumerate(targets) for _ in ts], device=logits.device)
    per_seq = torch.zeros(len(seqs), device=logits.device).index_add_(0, owner, token_lp)
    scores = per_seq.view(len(prompts), n_classes)
    if not with_features:
        return scores
    first_of_each = torch.tensor([sum(map(len, targets[:i])) for i in range(0, len(seqs), n_classes)],
                                 device=logits.device)
    return scores, hidden[first_of_each]


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
