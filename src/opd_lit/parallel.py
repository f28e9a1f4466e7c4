"""Data parallelism for the step: FSDP2 (``trainer=fsdp``), DDP (``trainer=ddp``), and the few
collectives the step needs. One process runs none of it (every helper is then the identity).

- :class:`FSDP2Strategy` is Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy`
  with the whole world as one data-parallel dimension (no tensor parallelism) and the options
  of :func:`shard_student`: ``fully_shard`` per decoder layer and on the root, bf16 mixed
  precision on GPUs (fp32 reduce), activation checkpointing of each layer. It runs on the CPU
  with gloo (how CI tests it) and on GPUs with NCCL.
- :func:`forward_call` runs any function of the student *as its forward*: FSDP2 gathers the
  root's parameters (embeddings, final norm, LM head) only around a module's forward, and
  the scorer calls the backbone and the LM head weight directly.
- :func:`full_parameters` unshards every FSDP unit for the duration of a block with no
  collectives inside it: ``generate`` runs a different number of forwards on every rank (its
  prompts and stopping points differ), which the per-layer all-gathers would deadlock on.
- :func:`gradient_sync` turns gradient communication off for all but the last micro-batch.
- :func:`all_reduce_sum`, :func:`all_reduce_max`, :func:`all_gather_rows` are what the step's
  global token count, global random-release permutation and metric reduction use.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn

log = logging.getLogger(__name__)

MIXED_PRECISION = ("auto", "bf16", "fp32")


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process (``trainer=fsdp``); the student is sharded in ``configure_model``.

    ``mixed_precision``: ``auto`` = bf16 parameters with fp32 gradient reduction on GPUs and
    fp32 on the CPU; ``bf16`` / ``fp32`` force it. ``activation_checkpointing``: recompute each
    decoder layer in the backward. ``reshard_after_forward``: free each layer's gathered
    parameters after its forward (ZeRO-3; ``false`` keeps them until the backward, ZeRO-2).
    ``shard_teacher``: shard the frozen teacher (and reference) the same way instead of
    replicating it on every rank (a 30B teacher does not fit unsharded beside the student).
    """

    def __init__(
        self,
        mixed_precision: str = "auto",
        activation_checkpointing: bool = True,
        reshard_after_forward: bool = True,
        shard_teacher: bool = False,
        **kwargs: Any,
    ):
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"trainer.strategy.mixed_precision={mixed_precision!r} is not one of {list(MIXED_PRECISION)}"
            )
        kwargs.pop("data_parallel_size", None)
        kwargs.pop("tensor_parallel_size", None)
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
        self.mixed_precision = mixed_precision
        self.activation_checkpointing = bool(activation_checkpointing)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.shard_teacher = bool(shard_teacher)

    def setup_environment(self) -> None:
        # The whole world is one data-parallel dimension (Lightning's "auto" would make it
        # the number of nodes, with tensor parallelism inside each node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def param_dtype(self) -> torch.dtype | None:
        """The compute dtype of sharded modules (None: keep the parameters' own)."""
        if self.mixed_precision == "bf16" or (
            self.mixed_precision == "auto" and self.root_device.type == "cuda"
        ):
            return torch.bfloat16
        return None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (``model.model.layers``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(model).__name__}: cannot find its decoder layers (model.model.layers); "
            "trainer=fsdp shards Hugging Face causal LMs layer by layer"
        )
    return list(layers)


def _call_as_forward(self: nn.Module, fn, *args, **kwargs):
    return fn(self, *args, **kwargs)


def shard_model(
    model: nn.Module,
    mesh,
    *,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` each decoder layer, then the root; returns ``model``.

    Registers ``opd_forward_call`` (used by :func:`forward_call`) as a forward method of the
    root, so that FSDP gathers the root's parameters around it. Generation runs inside
    :func:`full_parameters` instead (a different number of forwards on every rank).
    """
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    if activation_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        # transformers' own per-layer checkpointing: the FSDP hooks of a layer run again when
        # it is recomputed, and parameter names stay those of the checkpoint on disk.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    model.opd_forward_call = types.MethodType(_call_as_forward, model)
    register_fsdp_forward_method(model, "opd_forward_call")
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def forward_call(model: nn.Module, fn, *args, **kwargs):
    """``fn(model, *args, **kwargs)``, run as the model's forward when it is FSDP-sharded."""
    if is_sharded(model):
        return model.opd_forward_call(fn, *args, **kwargs)
    return fn(model, *args, **kwargs)


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Every FSDP unit of ``model`` unsharded for the block, with no collectives inside it.

    All ranks enter together (the all-gathers happen here, in the same order on every rank);
    inside, each rank may run any number of forwards (generation). Identity for a plain model.
    """
    if not is_sharded(model):
        yield model
        return
    units = _fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


@contextlib.contextmanager
def gradient_sync(trainer, enabled: bool) -> Iterator[None]:
    """Gradient communication on (``enabled``) or off for the backward passes in the block.

    Off, gradients accumulate locally; the next synchronised backward reduces the sum (DDP
    all-reduce, FSDP2 reduce-scatter). One process: nothing to do.
    """
    strategy = getattr(trainer, "strategy", None)
    if enabled or strategy is None:
        yield
        return
    if isinstance(strategy, DDPStrategy):
        with strategy.block_backward_sync():
            yield
        return
    module = getattr(strategy, "lightning_module", None)
    student = getattr(module, "student", None)
    if student is not None and is_sharded(student):
        student.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            student.set_requires_gradient_sync(True)
        return
    yield


# ---- collectives ---------------------------------------------------------------------


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1
    )


def world_size() -> int:
    return torch.distributed.get_world_size() if distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def _comm_device(x: torch.Tensor) -> torch.device:
    backend = torch.distributed.get_backend()
    return x.device if backend != "gloo" else torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks (a new tensor on ``x``'s device; ``x`` itself if one process)."""
    if not distributed():
        return x
    y = x.detach().to(_comm_device(x), copy=True)
    torch.distributed.all_reduce(y, op=torch.distributed.ReduceOp.SUM)
    return y.to(x.device)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if not distributed():
        return x
    y = x.detach().to(_comm_device(x), copy=True)
    torch.distributed.all_reduce(y, op=torch.distributed.ReduceOp.MAX)
    return y.to(x.device)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``[W·B, ...]``: every rank's ``[B, ...]`` rows, rank 0's first (equal ``B`` on all ranks)."""
    if not distributed():
        return x
    y = x.detach().to(_comm_device(x)).contiguous()
    parts = [torch.empty_like(y) for _ in range(world_size())]
    torch.distributed.all_gather(parts, y)
    return torch.cat(parts).to(x.device)


def local_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's ``[B, ...]`` block of a global ``[W·B, ...]`` tensor (inverse of the gather)."""
    if not distributed():
        return x
    b = x.shape[0] // world_size()
    return x[rank() * b : (rank() + 1) * b]


def full_state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of each parameter and buffer, gathered one at a time.

    Sharded parameters (DTensor) are all-gathered one by one on every rank (call it on all
    ranks, in step), so no rank ever holds a second full copy of the model at once.
    """
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        yield name, full.detach()
