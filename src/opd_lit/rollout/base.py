"""The rollout engine contract shared by ``hf`` and ``vllm``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation (the on-policy distribution)
    greedy: bool = False
    # Log-probs the engine should return with the samples (engines that compute them while
    # sampling; hf ignores it): None = none, 0 = each sampled token's log-prob, K > 0 = also
    # the student's top-K candidate ids at each position. Always of the raw model
    # distribution (temperature 1), whatever the sampling temperature.
    logprobs: int | None = None
    entropy: bool = False  # also the entropy of the raw distribution at each position (hf loop)


@dataclass
class Generation:
    """Sampled responses, one row per (prompt, sample), prompts in order, samples adjacent."""

    response_ids: list[list[int]]  # sampled tokens incl. the end-of-turn token when emitted
    # Optional: engines that compute them while sampling (vLLM, the hf loop) fill these;
    # what is missing the step scores with the student (one no-grad forward).
    logprobs: list[list[float]] | None = None
    topk_ids: list[list[list[int]]] | None = None
    entropy: list[list[float]] | None = None


class RolloutEngine(Protocol):
    name: str
    engine_copy: bool  # samples from its own copy of the weights (vLLM), not the trained module

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> Generation:
        """Sample ``n`` responses for each tokenised prompt."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load the student's current weights into the engine (after an optimizer step)."""
