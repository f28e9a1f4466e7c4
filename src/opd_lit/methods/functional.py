"""Pure tensor functions behind ``exopd``, ``fixed_prefix`` and ``release_random``.

No Lightning, no models: each method's ``supervise()`` only calls these. LGR's math lives
with its teacher lookahead in :mod:`opd_lit.lookahead`. The kept-mass rescaling is the
release rule's own :func:`opd_lit.release.apply_release_tokens` (one implementation).
"""

from __future__ import annotations

import math

import torch

from opd_lit.release import apply_release_tokens

SCHEDULES = ("constant", "linear")


# ---------------------------------------------------------------------------
# exopd
# ---------------------------------------------------------------------------


def exopd_advantage(
    teacher_logprobs: torch.Tensor,  # [B, T]  log p_T(y_t)
    ref_logprobs: torch.Tensor,  # [B, T]  log p_ref(y_t)
    student_logprobs: torch.Tensor,  # [B, T]  log p_S(y_t)
    mask: torch.Tensor,  # [B, T]
    lam: float,
) -> torch.Tensor:
    """``[B, T]``: ``A_t = λ·log p_T + (1 − λ)·log p_ref − log p_S`` on response tokens, else 0.

    λ = 1 is OPD bit for bit (``1·a + 0·b = a`` exactly for finite ``b``); λ = 0 is
    ``log p_ref − log p_S``; λ > 1 extrapolates the teacher's reward past the reference.
    """
    lam = float(lam)
    mixed = lam * teacher_logprobs + (1.0 - lam) * ref_logprobs  # [B, T]
    return (mixed - student_logprobs.detach()) * (mask > 0)


# ---------------------------------------------------------------------------
# fixed_prefix
# ---------------------------------------------------------------------------


def scheduled_prefix_len(
    step: int, total_steps: int, start_len: int, end_len: int, schedule: str
) -> int:
    """Prefix length ``L`` at optimizer step ``step`` (0-based) of ``total_steps``.

    ``constant``: ``end_len``. ``linear``: ``start_len`` at step 0, ``end_len`` at the last
    step (``total_steps − 1``) and after, linear (rounded to the nearest token) in between.
    """
    if schedule == "constant":
        return int(end_len)
    if schedule != "linear":
        raise ValueError(f"unknown prefix schedule {schedule!r}; expected one of {list(SCHEDULES)}")
    span = max(1, int(total_steps) - 1)
    frac = min(1.0, max(0.0, step / span))
    return math.floor(start_len + (end_len - start_len) * frac + 0.5)


def prefix_weight(
    mask: torch.Tensor,  # [B, T]  response mask
    prefix_len: int,
    rescale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervise response tokens ``t < prefix_len``: ``(weight [B, T], scale [B])``.

    ``rescale=False`` (the paper's §4.1: the standard OPD objective, supervision halted after
    a global prefix): the plain ``mask · [t < L]`` with scale 1. ``rescale=True``: kept tokens
    are scaled by ``total mass / kept mass`` per sample (the release rule's rescaling, so each
    sample keeps its loss mass; a 16k-token response with L = 1024 weighs its prefix 16×).
    """
    b = mask.shape[0]
    release = torch.full((b,), int(prefix_len), dtype=torch.long, device=mask.device)  # [B]
    weight, keep, scale = apply_release_tokens(mask, release)
    if rescale:
        return weight, scale
    plain = mask.to(weight.dtype) * keep  # [B, T]
    return plain, torch.ones_like(scale)


# ---------------------------------------------------------------------------
# release_random
# ---------------------------------------------------------------------------

#: What ``release_random`` moves between samples (``method.permute``).
PERMUTE_MODES = ("relative", "absolute")


def derive_seed(base_seed: int, step: int) -> int:
    """A generator seed for ``(base_seed, step)``, decorrelated from the prompt sampler's."""
    mix = int(base_seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 0x5EED
    return mix % (1 << 63)


def stratified_permutation(
    lengths: torch.Tensor,  # [B]  response lengths
    generator: torch.Generator,
    stratum_size: int | None = None,
    eligible: torch.Tensor | None = None,  # [B] bool: samples that take part (default all)
) -> torch.Tensor:
    """``[B]`` long ``src``: sample ``b`` takes the release point of sample ``src[b]``.

    The eligible samples are sorted by length (ties in random order) and cut into
    ``max(1, round(n / stratum_size))`` consecutive strata of near-equal size; each stratum is
    permuted uniformly at random (``stratum_size=None``: one stratum, a uniform permutation of
    all eligible samples). Other samples keep their own (``src[b] = b``). Deterministic given
    the generator's state; on the CPU. For a global permutation across ranks, call it on the
    all-gathered lengths with a generator seeded identically on every rank.
    """
    lengths = lengths.detach().to("cpu", torch.long)
    b = lengths.shape[0]
    src = torch.arange(b)
    members = torch.arange(b) if eligible is None else eligible.detach().cpu().nonzero().flatten()
    n = members.numel()
    if n < 2:
        return src
    shuffled = members[torch.randperm(n, generator=generator)]
    order = shuffled[torch.argsort(lengths[shuffled], stable=True)]  # by length, ties random
    groups = 1 if stratum_size is None else max(1, round(n / int(stratum_size)))
    bounds = torch.linspace(0, n, groups + 1).round().long().tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        stratum = order[lo:hi]
        src[stratum] = stratum[torch.randperm(hi - lo, generator=generator)]
    return src


def permute_release_points(
    release_token: torch.Tensor,  # [B] long  first released token (>= length: nothing released)
    lengths: torch.Tensor,  # [B]  response lengths
    generator: torch.Generator,
    mode: str = "relative",
    stratum_size: int | None = 32,
) -> torch.Tensor:
    """``[B]`` long: each sample's new release token, ``length`` where nothing is released.

    ``mode="relative"`` moves the relative release point ``r = min(release, L) / L`` (1 = no
    release) between samples and puts it back on the receiving sample's length:
    ``round(r · L_b)``, within ``[1, L_b − 1]`` when ``r < 1``. Only samples of length >= 2
    (the ones that can hold a release) take part, so the released fraction is preserved
    exactly; within strata of similar length (:func:`stratified_permutation`) the kept-token
    fraction is preserved too (a 1,024-sample log-normal batch: within 0.2 points, see the
    README). ``mode="absolute"`` moves the token position itself and clips it to the
    receiving length (``stratum_size=None``: the first version of the control, which loses
    supervision when long and short responses swap release points).
    """
    if mode not in PERMUTE_MODES:
        raise ValueError(f"method.permute={mode!r}: allowed is one of {list(PERMUTE_MODES)}")
    device = release_token.device
    lengths = lengths.detach().to("cpu", torch.long)
    point = torch.minimum(release_token.detach().to("cpu", torch.long), lengths)  # [B]
    if mode == "absolute":
        src = stratified_permutation(lengths, generator, stratum_size)
        never = torch.full_like(point, int(lengths.max()) if lengths.numel() else 0)
        token = torch.where(point < lengths, point, never)  # "no release" moves as no release
        return torch.minimum(token[src], lengths).to(device)
    eligible = lengths >= 2
    src = stratified_permutation(lengths, generator, stratum_size, eligible)
    relative = torch.where(
        lengths > 0, point.double() / lengths.clamp_min(1).double(), torch.ones(lengths.shape, dtype=torch.float64)
    )  # [B] in [0, 1]
    moved = relative[src]  # [B]
    placed = torch.floor(moved * lengths.double() + 0.5).long()
    placed = torch.maximum(torch.minimum(placed, lengths - 1), torch.ones_like(placed))
    out = torch.where(eligible & (moved < 1.0), placed, lengths)
    return out.to(device)
