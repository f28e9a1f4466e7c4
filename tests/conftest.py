"""Shared fixtures: tiny random Qwen3 models (no download) for unit tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Nothing in the suite may reach a model or dataset hub (CI has none): fail instead of fetching.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_qwen3(vocab: int = 67, hidden: int = 32, layers: int = 2, seed: int = 0, tie: bool = True):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=256, tie_word_embeddings=tie,
    )
    model = Qwen3ForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.fixture
def tiny_model():
    return tiny_qwen3()


def random_rollout(batch: int, prompt: int, resp: int, vocab: int, seed: int = 0, pad: int = 0):
    """Left-padded prompts and right-padded responses of random lengths (>= 1 prompt token)."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(1, prompt + 1, (batch,), generator=g)
    r_len = torch.randint(0, resp + 1, (batch,), generator=g)
    r_len[0] = resp  # at least one full-width row
    p_ids = torch.full((batch, prompt), pad)
    p_mask = torch.zeros((batch, prompt), dtype=torch.long)
    r_ids = torch.full((batch, resp), pad)
    r_mask = torch.zeros((batch, resp))
    for i in range(batch):
        p_ids[i, prompt - p_len[i]:] = torch.randint(1, vocab, (int(p_len[i]),), generator=g)
        p_mask[i, prompt - p_len[i]:] = 1
        r_ids[i, : r_len[i]] = torch.randint(1, vocab, (int(r_len[i]),), generator=g)
        r_mask[i, : r_len[i]] = 1
    return p_ids, p_mask, r_ids, r_mask
