"""``rollout=hf``: sampling from the training copy of the student with transformers models.

Two decoders (``rollout.engine_options.decoder``):

- ``loop`` (the default): :func:`opd_lit.rollout.decode.decode`, a KV-cache decoding loop
  that also returns the student's log-prob of each sampled token, its top-K candidate ids and
  its entropy (the raw distribution, temperature 1), so the step needs no second student pass;
- ``generate``: transformers ``generate`` (tokens only; the step then scores the responses
  with one no-grad student forward). Kept as the reference path.

The engine samples from the very module being trained, so weight sync is a no-op; it still
goes through :meth:`sync_weights` so that the training loop is the same for every engine.
Under ``trainer=fsdp`` the sharded student is gathered for the duration of each call
(:func:`opd_lit.parallel.full_parameters`): every rank samples its own prompts to its own
lengths, with no collective inside the decoding loop.
"""

from __future__ import annotations

import torch

from opd_lit.batch import left_pad
from opd_lit.parallel import full_parameters
from opd_lit.rollout.base import Generation, SamplingParams
from opd_lit.rollout.decode import decode

DECODERS = ("loop", "generate")


class HFEngine:
    name = "hf"
    engine_copy = False  # samples from the trained module itself (its log-probs are π_θ's)

    def __init__(self, model: torch.nn.Module, pad_id: int, eos_ids: list[int], batch_size: int = 64,
                 decoder: str = "loop"):
        if decoder not in DECODERS:
            raise ValueError(f"rollout.engine_options.decoder={decoder!r} is not one of {list(DECODERS)}")
        self.model = model
        self.pad_id = pad_id
        self.eos_ids = list(eos_ids)
        self.batch_size = batch_size
        self.decoder = decoder
        self.syncs = 0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> Generation:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = Generation(response_ids=[])
        scored = self.decoder == "loop" and params.logprobs is not None
        if scored:
            out.logprobs = []
            out.topk_ids = [] if params.logprobs else None
            out.entropy = [] if params.entropy else None
        try:
            with full_parameters(model):
                for start in range(0, len(prompts), self.batch_size):
                    ids, mask = left_pad(prompts[start : start + self.batch_size], self.pad_id)
                    ids, mask = ids.to(device), mask.to(device)
                    if self.decoder == "loop":
                        self._loop(model, ids, mask, n, params, out)
                    else:
                        seqs = self._generate(model, ids, mask, n, params)[:, ids.shape[1] :].tolist()
                        out.response_ids.extend(self._strip(s) for s in seqs)
        finally:
            model.train(was_training)
        return out

    def _loop(self, model, ids, mask, n: int, params: SamplingParams, out: Generation) -> None:
        d = decode(model, ids, mask, n, params, self.eos_ids, self.pad_id)
        lengths = d.lengths.tolist()
        out.response_ids.extend(row[:n_] for row, n_ in zip(d.tokens.tolist(), lengths))
        if out.logprobs is not None and d.logprobs is not None:
            out.logprobs.extend(row[:n_] for row, n_ in zip(d.logprobs.tolist(), lengths))
        if out.topk_ids is not None and d.topk_ids is not None:
            out.topk_ids.extend(row[:n_] for row, n_ in zip(d.topk_ids.tolist(), lengths))
        if out.entropy is not None and d.entropy is not None:
            out.entropy.extend(row[:n_] for row, n_ in zip(d.entropy.tolist(), lengths))

    def _generate(self, model, ids, mask, n: int, params: SamplingParams) -> torch.Tensor:
        kwargs = dict(
            input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, num_return_sequences=n, use_cache=True,
        )
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k,  # 0 disables generate's default top_k=50
            )
        return model.generate(**kwargs)

    def _strip(self, seq: list[int]) -> list[int]:
        """Cut at the first end-of-turn token (kept) and drop the padding after it."""
        for i, tok in enumerate(seq):
            if tok in self.eos_ids:
                return seq[: i + 1]
        while seq and seq[-1] == self.pad_id and self.pad_id not in self.eos_ids:
            seq = seq[:-1]
        return seq

    def sync_weights(self, model: torch.nn.Module) -> None:
        # Same module object: nothing to copy. Counted so tests can see the hook fires.
        self.syncs += 1
