"""Rollout engines: ``hf`` (transformers generate) and ``vllm`` (in-process vLLM)."""

from opd_lit.rollout.base import Generation, RolloutEngine, SamplingParams
from opd_lit.rollout.hf import HFEngine

ENGINES = ("hf", "vllm")


def build_engine(name: str, model, pad_id: int, eos_ids: list[int], **options) -> RolloutEngine:
    if name == "hf":
        return HFEngine(model, pad_id=pad_id, eos_ids=eos_ids, **options)
    if name == "vllm":
        from opd_lit.rollout.vllm import VLLMEngine  # imports vLLM only when asked for

        return VLLMEngine(model, pad_id=pad_id, eos_ids=eos_ids, **options)
    raise ValueError(f"rollout.engine={name!r} is not one of {list(ENGINES)}")


__all__ = ["ENGINES", "Generation", "HFEngine", "RolloutEngine", "SamplingParams", "build_engine"]
