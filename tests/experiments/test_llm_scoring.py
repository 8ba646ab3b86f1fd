"""Chat prompts and label-word scoring of the llm task, on a tiny random Llama and a tiny
tokenizer: scores are checked against log-likelihoods computed token by token from the model's
plain forward pass on each unpadded sequence."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from spdecay.experiments.errors import RunnerError  # noqa: E402
from spdecay.experiments.tasks.llm.scoring import (  # noqa: E402
    PromptEncoder,
    PromptFormat,
    answer_loss,
    chat_prompt,
    label_log_likelihoods,
)
from tests.helpers.llm_tiny import tiny_llama, tiny_tokenizer  # noqa: E402

SENTIMENT = PromptFormat("Is this review positive or negative?", ("positive", "negative"))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok))


def hand_log_likelihood(model, prompt_ids, label_ids):
    """sum_j log p(label_j | prompt, label_<j) from one unpadded forward pass, token by token."""
    seq = torch.tensor([list(prompt_ids) + list(label_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
    total = 0.0
    for j, token in enumerate(label_ids):
        total += float(logp[len(prompt_ids) - 1 + j, token])
    return total


def test_chat_prompt_is_the_template_with_instruction_text_and_open_assistant_turn(tok):
    text = "a great film"
    assert chat_prompt(tok, SENTIMENT, text) == (
        "<|im_start|>system\nIs this review positive or negative?<|im_end|>\n"
        "<|im_start|>user\na great film<|im_end|>\n<|im_start|>assistant\n"
    )
    enc = PromptEncoder(tok, SENTIMENT, max_length=64)
    ids = enc.encode(text)
    assert tok.decode(ids) == chat_prompt(tok, SENTIMENT, text)  # pieces tokenised separately join exactly
    assert enc.encode_all([text, "a dull movie"])[0] == ids
    assert [tok.decode(x) for x in enc.label_ids] == ["positive", "negative"]


def test_long_text_is_cut_so_prompt_plus_longest_answer_fits(tok):
    enc = PromptEncoder(tok, SENTIMENT, max_length=40)
    long_text = "the team won the match and the market rose " * 20
    ids = enc.encode(long_text)
    assert len(ids) + max(map(len, enc.label_ids)) == 40
    assert tok.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")  # the markup survives
    assert tok.decode(ids).startswith("<|im_start|>system\nIs this review")
    with pytest.raises(RunnerError, match="leaving .* for the text"):
        PromptEncoder(tok, SENTIMENT, max_length=len(enc.prefix) + 4)


@pytest.mark.parametrize("labels", [("positive", "negative"), ("sport", "tech", "politics", "entertainment")])
def test_label_scores_match_hand_computed_log_likelihood(tok, model, labels):
    fmt = PromptFormat("Topic of this article?", labels)
    enc = PromptEncoder(tok, fmt, max_length=64)
    texts = ["a great film with a fine cast", "dull", "parliament voted on the bill today"]
    prompts = enc.encode_all(texts)  # different lengths: the batch is padded
    multi_token = any(len(x) > 1 for x in enc.label_ids)
    assert multi_token == (len(labels) > 2)  # both scoring paths are exercised
    with torch.no_grad():
        scores, features = label_log_likelihoods(model, prompts, enc.label_ids, tok.pad_token_id, with_features=True)
    assert scores.shape == (3, len(labels))
    for b, prompt in enumerate(prompts):
        for c, label in enumerate(enc.label_ids):
            assert math.isclose(float(scores[b, c]), hand_log_likelihood(model, prompt, label), abs_tol=1e-4)
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
        torch.testing.assert_close(features[b], hidden, atol=1e-5, rtol=1e-4)


def test_answer_loss_is_mean_cross_entropy_over_answer_tokens(tok, model):
    fmt = PromptFormat("Topic?", ("sport", "entertainment"))
    enc = PromptEncoder(tok, fmt, max_length=64)
    prompts = enc.encode_all(["the team won", "a fine cast in a great film"])
    answers = [enc.label_ids[0], enc.label_ids[1]]
    with torch.no_grad():
        loss, _ = answer_loss(model, prompts, answers, tok.pad_token_id)
    n_tokens = sum(map(len, answers))
    expected = -sum(hand_log_likelihood(model, p, a) for p, a in zip(prompts, answers)) / n_tokens
    assert math.isclose(float(loss), expected, rel_tol=1e-5)
