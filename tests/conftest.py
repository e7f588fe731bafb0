"""Tiny random models for fast, seeded CPU tests (vocab 256, 2 layers, hidden 64)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftsmith.models.target import Target

VOCAB = 256


def tiny_llama(seed: int, layers: int = 2, vocab: int = VOCAB, hidden: int = 64,
               max_positions: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    # random init gives near-uniform logits; sharpen them so greedy has clear winners and
    # sampling tests see a peaked law (untied, so the next token is not the current one)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.fixture
def target() -> Target:
    return Target(tiny_llama(0), tokenizer=None, name="tiny-target")


@pytest.fixture
def target4() -> Target:
    """A tiny 4-layer target: room for three tapped layers and a last one (feature-level kinds)."""
    return Target(tiny_llama(0, layers=4), tokenizer=None, name="tiny-target-4")


@pytest.fixture
def other_model() -> LlamaForCausalLM:
    return tiny_llama(1)


def prompts(n: int = 4, length: int = 12, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


def perturbed(head: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """A fresh head with seeded noise on every weight: a "random" drafter that still drafts sensibly."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * scale)
    return head


def noisy_copy(model: torch.nn.Module, seed: int = 3, scale: float = 0.5) -> torch.nn.Module:
    """A copy of a model with seeded noise of `scale` x each weight's std: as a drafter of the model it agrees
    often but not always (partial acceptance)."""
    noisy = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for w in noisy.parameters():
            w.add_(torch.randn_like(w) * w.std() * scale)
    return noisy


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (its tests train or run servers beside each other's threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
