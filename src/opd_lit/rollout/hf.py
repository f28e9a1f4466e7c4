"""``rollout=hf``: transformers ``generate`` on the training copy of the student.

The engine samples from the very module being trained, so weight sync is a no-op; it still
goes through :meth:`sync_weights` so that the training loop is the same for every engine.
Under ``trainer=fsdp`` the sharded student is gathered for the duration of each ``generate``
(:func:`opd_lit.parallel.full_parameters`): every rank samples its own prompts to its own
lengths, with no collective inside the decoding loop.
"""

from __future__ import annotations

import torch

from opd_lit.batch import left_pad
from opd_lit.parallel import full_parameters
from opd_lit.rollout.base import Generation, SamplingParams


class HFEngine:
    name = "hf"

    def __init__(self, model: torch.nn.Module, pad_id: int, eos_ids: list[int], batch_size: int = 64):
        self.model = model
        self.pad_id = pad_id
        self.eos_ids = list(eos_ids)
        self.batch_size = batch_size
        self.syncs = 0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> Generation:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out: list[list[int]] = []
        try:
            with full_parameters(model):
                for start in range(0, len(prompts), self.batch_size):
                    chunk = prompts[start : start + self.batch_size]
                    ids, mask = left_pad(chunk, self.pad_id)
                    kwargs = dict(
                        input_ids=ids.to(device),
                        attention_mask=mask.to(device),
                        max_new_tokens=params.max_new_tokens,
                        eos_token_id=self.eos_ids,
                        pad_token_id=self.pad_id,
                        num_return_sequences=n,
                        use_cache=True,
                    )
                    if params.greedy:
                        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                    else:
                        kwargs.update(
                            do_sample=True,
                            temperature=params.temperature,
                            top_p=params.top_p,
                            top_k=params.top_k,  # 0 disables generate's default top_k=50
                        )
                    seqs = model.generate(**kwargs)[:, ids.shape[1] :].tolist()
                    out.extend(self._strip(s) for s in seqs)
        finally:
            model.train(was_training)
        return Generation(response_ids=out)

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
