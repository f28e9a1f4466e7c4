"""Tests of the suffix-release rule (opd_lit.release.rule)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest
import torch

from opd_lit.release import (
    BIC_TIE_RTOL,
    MEAN_TIE_RTOL,
    RSS_EPS,
    apply_release_tokens,
    bic_change_point,
    release_weights,
    release_weights_batch,
    segment_adv_std_scores,
    segment_scores,
    teacher_margin,
)

LOG_FLOOR = math.log(1e-12)


# ---------------------------------------------------------------------------
# reference: the rule written as the plain O(n^2) loop of the specification
# ---------------------------------------------------------------------------


def naive_change_point(values):
    """Sequential loop over tau; RSS by two passes; same tie tolerances as the library."""
    v = [float(x) for x in values]
    n = len(v)
    if n < 2 or not all(math.isfinite(x) for x in v):
        return n, False, 0.0

    def mean(xs):
        return math.fsum(xs) / len(xs)

    def rss(xs):
        m = mean(xs)
        return math.fsum((x - m) ** 2 for x in xs)

    def bic(r, k):
        return n * math.log((r + RSS_EPS) / n) + k * math.log(n)

    bic0 = bic(rss(v), 1)
    tol_bic = BIC_TIE_RTOL * (n + abs(bic0))
    tol_mean = MEAN_TIE_RTOL * (1.0 + max(abs(x) for x in v))
    best, best_tau = bic0, None
    for tau in range(1, n):
        left, right = v[:tau], v[tau:]
        if not mean(right) < mean(left) - tol_mean:  # downward only
            continue
        bic1 = bic(rss(left) + rss(right), 3)
        if bic1 < best - tol_bic:
            best, best_tau = bic1, tau
    if best_tau is None:
        return n, False, 0.0
    return best_tau, True, max(0.0, bic0 - best)


def random_scores(rng: random.Random):
    n = rng.randint(0, 40)
    kind = rng.randrange(5)
    if kind == 0:  # continuous noise
        return [rng.gauss(1.0, 0.5) for _ in range(n)]
    if kind == 1:  # few distinct values: many exact ties and constant runs
        levels = [0.0, 0.5, 1.0, 2.0]
        return [rng.choice(levels) for _ in range(n)]
    if kind == 2:  # piecewise constant with a drop (plus constant runs)
        k = rng.randint(0, n)
        hi, lo = rng.choice([1.0, 2.0, 3.3]), rng.choice([0.0, 0.1, 1.0])
        return [hi] * k + [lo] * (n - k)
    if kind == 3:  # noisy drop
        k = rng.randint(0, n)
        return [rng.gauss(2.0, 0.3) for _ in range(k)] + [rng.gauss(0.5, 0.3) for _ in range(n - k)]
    # non-representable decimals in runs (0.1, 0.3 ...), log1p-like values
    return [math.log1p(rng.choice([0.1, 0.2, 0.3, 0.7])) for _ in range(n)]


# ---------------------------------------------------------------------------
# teacher_margin
# ---------------------------------------------------------------------------


def test_teacher_margin_known_values():
    lp = torch.tensor(
        [
            [-0.1, -2.0, -3.0],  # 1.9
            [-3.0, -0.5, -0.7],  # ranked by value, not position: 0.2
            [-1.0, -1.0, -5.0],  # tie at the top: 0
        ]
    )
    torch.testing.assert_close(teacher_margin(lp), torch.tensor([1.9, 0.2, 0.0]))


def test_teacher_margin_clamps_at_log_1e_minus_12():
    lp = torch.tensor(
        [[-1.0, -100.0, -200.0], [-math.inf, -math.inf, -50.0], [-0.5, -math.inf, -math.inf]]
    )
    out = teacher_margin(lp)
    torch.testing.assert_close(out, torch.tensor([-1.0 - LOG_FLOOR, 0.0, -0.5 - LOG_FLOOR]))
    assert torch.isfinite(out).all()


def test_teacher_margin_batched_shape_and_k2():
    lp = torch.randn(3, 5, 2).log_softmax(-1)
    out = teacher_margin(lp)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, (lp[..., 0] - lp[..., 1]).abs())


@pytest.mark.parametrize("k", [0, 1])
def test_teacher_margin_needs_two_candidates(k):
    with pytest.raises(ValueError):
        teacher_margin(torch.zeros(4, k))


# ---------------------------------------------------------------------------
# bic_change_point: hand-made cases
# ---------------------------------------------------------------------------


def test_flat_scores_release_nothing():
    for n in (2, 3, 10, 50):
        for value in (0.0, 0.7, 1e-3, 12.5):
            cp = bic_change_point([value] * n)
            assert (cp.release_segment, cp.accepted, cp.bic_gain) == (n, False, 0.0)


def test_upward_only_releases_nothing():
    assert not bic_change_point([0.0, 0.0, 0.0, 2.0, 2.0, 2.0]).accepted
    assert not bic_change_point([0.1 * i for i in range(20)]).accepted
    cp = bic_change_point([0.0, 1.0])
    assert (cp.release_segment, cp.accepted, cp.bic_gain) == (2, False, 0.0)


def test_single_clear_drop():
    cp = bic_change_point([2.0, 2.1, 1.9, 2.0, 2.05, 0.3, 0.25, 0.35, 0.3])
    assert cp.accepted and cp.release_segment == 5 and cp.bic_gain > 0
    cp = bic_change_point(torch.tensor([1.5] * 5 + [0.5] * 5))
    assert cp.accepted and cp.release_segment == 5
    # exact fit on both sides: the RSS floor 1e-12 decides the size of the gain
    n = 10
    bic0 = n * math.log((n * 0.25 + RSS_EPS) / n) + math.log(n)
    bic1 = n * math.log(RSS_EPS / n) + 3 * math.log(n)
    assert cp.bic_gain == pytest.approx(bic0 - bic1, rel=1e-9)


def test_ties_pick_the_first_tau():
    # tau=1 and tau=3 both leave RSS 2/3; tau=2 leaves 1
    cp = bic_change_point([2.0, 1.0, 1.0, 0.0])
    assert cp.accepted and cp.release_segment == 1
    # the same tie with values that are not exact in binary
    cp = bic_change_point([0.3, 0.2, 0.2, 0.1])
    assert cp.accepted and cp.release_segment == 1
    # equal means on both sides of tau=2 is not "downward"
    assert bic_change_point([1.0, 0.0, 0.0, 1.0]).release_segment != 2


def test_small_n():
    assert bic_change_point([]) == bic_change_point(torch.zeros(0))
    cp = bic_change_point([])
    assert (cp.release_segment, cp.accepted, cp.bic_gain) == (0, False, 0.0)
    cp = bic_change_point([3.0])
    assert (cp.release_segment, cp.accepted, cp.bic_gain) == (1, False, 0.0)
    cp = bic_change_point([1.0, 0.0])  # any strict drop is an exact two-point fit
    assert (cp.release_segment, cp.accepted) == (1, True) and cp.bic_gain > 0
    assert not bic_change_point([1.0, 1.0]).accepted
    assert not bic_change_point([0.0, 1.0]).accepted


def test_non_finite_scores_release_nothing():
    cp = bic_change_point([2.0, 2.0, float("nan"), 0.0, 0.0])
    assert (cp.release_segment, cp.accepted, cp.bic_gain) == (5, False, 0.0)


def test_change_point_is_frozen():
    cp = bic_change_point([1.0, 0.0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cp.accepted = False  # type: ignore[misc]


def test_vectorised_matches_naive_loop_on_random_cases():
    rng = random.Random(1234)
    accepted = ties = 0
    for _ in range(800):
        values = random_scores(rng)
        want = naive_change_point(values)
        got = bic_change_point(values)
        assert (got.release_segment, got.accepted) == want[:2], values
        assert got.bic_gain == pytest.approx(want[2], rel=1e-7, abs=1e-7), values
        accepted += got.accepted
        ties += len(set(values)) < len(values)
    # the sample exercises both outcomes and plenty of repeated values
    assert 150 < accepted < 700 and ties > 300


# ---------------------------------------------------------------------------
# segment scores
# ---------------------------------------------------------------------------


def test_segment_scores_log1p_mean():
    margins = torch.tensor([1.0, 3.0, 0.0, 0.5, 0.5, 9.0])
    segments = [[0, 1], [2, 3, 4], [5]]
    want = torch.tensor(
        [math.log1p(2.0), math.log1p(1.0 / 3.0), math.log1p(9.0)], dtype=torch.float64
    )
    torch.testing.assert_close(segment_scores(margins, segments), want)
    with pytest.raises(ValueError):
        segment_scores(margins, [[0, 1], []])
    with pytest.raises(ValueError):
        segment_scores(margins, [[0, 6]])


def test_adv_std_scores_by_hand():
    adv = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, -1.0, 0.0, 4.0, 0.5])
    segments = [[0, 1], [2, 3, 4], [5, 6, 7], [8]]
    # population std: [1,3] -> 1; [2,2,2] -> 0; [-1,0,4] -> sqrt(14/3); [0.5] -> 0
    want = torch.tensor(
        [math.log1p(1.0), 0.0, math.log1p(math.sqrt(14.0 / 3.0)), 0.0], dtype=torch.float64
    )
    torch.testing.assert_close(segment_adv_std_scores(adv, segments), want)


def test_adv_std_release_without_teacher():
    # noisy advantages in the first three sentences, flat ones after: release at sentence 3
    adv = torch.tensor([3.0, -3.0, 2.5, -2.5, 3.0, -3.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    segments = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    mask = torch.ones(12)
    res = release_weights(adv, mask, None, segments, signal="adv_std")
    assert res.change_point.accepted and res.change_point.release_segment == 3
    assert res.release_token == 6
    torch.testing.assert_close(res.weight, torch.tensor([2.0] * 6 + [0.0] * 6))
    with pytest.raises(ValueError):
        release_weights(adv, mask, None, segments, signal="margin")
    with pytest.raises(ValueError):
        release_weights(adv, mask, None, segments, signal="entropy")


# ---------------------------------------------------------------------------
# release_weights (single sample)
# ---------------------------------------------------------------------------


def topk_with_margins(margins, k=4):
    """[T] margins -> [T, K] teacher log-probs whose top-1 minus top-2 is the margin."""
    margins = torch.as_tensor(margins, dtype=torch.float32)
    top1 = torch.full_like(margins, -0.05)
    cols = [top1, top1 - margins] + [top1 - margins - 1.0 - j for j in range(k - 2)]
    lp = torch.stack(cols, dim=-1)
    return lp[:, torch.randperm(k)]  # order of the candidates must not matter


def test_release_weights_clear_drop():
    seg_len = [3, 2, 4, 3, 2, 3]
    segments, start = [], 0
    for ln in seg_len:
        segments.append(list(range(start, start + ln)))
        start += ln
    t = start
    margins = [5.0] * 9 + [0.01] * (t - 9)  # decisive for 3 sentences, then not
    adv = torch.linspace(-1, 1, t)
    mask = torch.ones(t)
    res = release_weights(adv, mask, topk_with_margins(margins), segments)
    assert res.change_point.accepted and res.change_point.release_segment == 3
    assert res.release_token == 9
    keep = torch.tensor([1.0] * 9 + [0.0] * (t - 9))
    torch.testing.assert_close(res.keep_mask, keep)
    assert res.scale == pytest.approx(t / 9)
    torch.testing.assert_close(res.weight, keep * t / 9)
    torch.testing.assert_close(res.reweighted_advantages, adv * keep * (t / 9))
    assert float(res.weight.sum()) == pytest.approx(float(mask.sum()))


def test_single_segment_is_full_supervision():
    t = 7
    res = release_weights(
        torch.randn(t), torch.ones(t), torch.randn(t, 5).log_softmax(-1), [list(range(t))]
    )
    assert not res.change_point.accepted and res.release_token == t
    torch.testing.assert_close(res.weight, torch.ones(t))
    assert res.scale == 1.0


def test_empty_response_single_sample():
    t = 5
    res = release_weights(torch.zeros(t), torch.zeros(t), torch.full((t, 3), float("nan")), [])
    assert res.release_token == t and not res.change_point.accepted
    assert torch.equal(res.weight, torch.zeros(t))
    assert math.isfinite(res.scale)
    assert not torch.isnan(res.reweighted_advantages).any()


# ---------------------------------------------------------------------------
# apply_release_tokens
# ---------------------------------------------------------------------------


def test_apply_release_tokens_mass_and_prefix():
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 1, 0],  # prompt-free response with padding
            [1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0, 0],  # empty
            [1, 1, 1, 0, 0, 0, 0, 0],
        ],
        dtype=torch.float32,
    )
    rt = torch.tensor([4, 8, 3, 0])
    weight, keep, scale = apply_release_tokens(mask, rt)
    torch.testing.assert_close(keep[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(scale, torch.tensor([2.5, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(weight[0], torch.tensor([0, 0, 2.5, 2.5, 0, 0, 0, 0.0]))
    torch.testing.assert_close(weight[1], mask[1])
    # nothing kept (empty response, or release before the first masked token):
    # zero weight, finite scale
    assert torch.equal(weight[2], torch.zeros(8)) and torch.equal(weight[3], torch.zeros(8))
    assert torch.isfinite(scale).all() and not torch.isnan(weight).any()


def test_apply_release_tokens_random_release_permutation():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (16,), generator=g)
    mask = (torch.arange(30)[None, :] < lengths[:, None]).float()
    release = (torch.rand(16, generator=g) * lengths).long() + 1  # within each response
    permuted = release[torch.randperm(16, generator=g)]
    weight, keep, scale = apply_release_tokens(mask, permuted)
    kept_any = (mask * keep).sum(1) > 0
    assert torch.all(scale[~kept_any] == 1.0) and torch.all(scale[kept_any] >= 1.0)
    torch.testing.assert_close(weight.sum(1)[kept_any], mask.sum(1)[kept_any])
    assert torch.all(
        weight[:, :][torch.arange(30)[None, :].expand(16, 30) >= permuted[:, None]] == 0
    )


# ---------------------------------------------------------------------------
# release_weights_batch == per-sample
# ---------------------------------------------------------------------------


def random_batch(g: torch.Generator, b: int, t: int, k: int):
    """Random responses of random length and placement (some empty, some one
    sentence), cut into random sentences, with NaN teacher scores on padding."""

    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    seg_ids = torch.full((b, t), -1, dtype=torch.long)
    mask = torch.zeros(b, t)
    margins = torch.zeros(b, t)
    segments_per_row = []
    for i in range(b):
        length = 0 if i % 5 == 0 else randint(0, t)
        offset = randint(0, t - length)  # left and right padding
        if i % 7 == 3:  # one sentence
            cuts = []
        else:
            cuts = sorted({randint(1, max(length - 1, 1)) for _ in range(randint(0, 8))} - {length})
        bounds = [0, *cuts, length] if length else [0]
        segs = [list(range(offset + lo, offset + hi)) for lo, hi in itertools.pairwise(bounds)]
        for s_idx, pos in enumerate(segs):
            seg_ids[i, pos] = s_idx
        segments_per_row.append(segs)
        mask[i, offset : offset + length] = 1.0
        if length and randint(0, 2) == 0:  # an unsupervised token inside the response
            mask[i, offset + randint(0, length - 1)] = 0.0
        # a decisive prefix then a fade, with noise, quantised so that ties happen
        drop = randint(0, len(segs))
        for s_idx, pos in enumerate(segs):
            level = 3.0 if s_idx < drop else 0.2
            noise = torch.rand(len(pos), generator=g) * float(torch.rand(1, generator=g))
            margins[i, pos] = torch.round((level + noise) * 4) / 4
    top1 = torch.full((b, t, 1), -0.01)
    second = top1 - margins[..., None]
    others = second - 1.0 - torch.rand(b, t, k - 2, generator=g)
    lp = torch.cat([top1, second, others], dim=-1)[..., torch.randperm(k, generator=g)]
    lp = torch.where(
        seg_ids[..., None] >= 0, lp, torch.full_like(lp, float("nan"))
    )  # garbage padding
    adv = torch.randn(b, t, generator=g) * (torch.rand(b, t, generator=g) < 0.7)
    adv = torch.round(adv * 2) / 2
    return adv, mask, lp, seg_ids, segments_per_row


@pytest.mark.parametrize("signal", ["margin", "adv_std"])
def test_batch_equals_per_sample(signal):
    g = torch.Generator().manual_seed(7 if signal == "margin" else 8)
    n_accepted = 0
    for _ in range(25):
        b, t, k = (
            int(torch.randint(1, 9, (1,), generator=g)),
            int(torch.randint(1, 48, (1,), generator=g)),
            4,
        )
        adv, mask, lp, seg_ids, segments = random_batch(g, b, t, k)
        out = release_weights_batch(
            adv, mask, lp if signal == "margin" else None, seg_ids, signal=signal
        )
        for i in range(b):
            ref = release_weights(
                adv[i], mask[i], lp[i] if signal == "margin" else None, segments[i], signal=signal
            )
            n = len(segments[i])
            assert int(out.num_segments[i]) == n
            assert int(out.release_segment[i]) == ref.change_point.release_segment
            assert bool(out.accepted[i]) == ref.change_point.accepted
            assert float(out.bic_gain[i]) == pytest.approx(
                ref.change_point.bic_gain, rel=1e-9, abs=1e-9
            )
            assert int(out.release_token[i]) == ref.release_token
            assert float(out.scale[i]) == pytest.approx(ref.scale)
            torch.testing.assert_close(out.keep_mask[i], ref.keep_mask)
            torch.testing.assert_close(out.weight[i], ref.weight)
            torch.testing.assert_close(out.segment_scores[i, :n], ref.segment_scores)
            assert torch.isnan(out.segment_scores[i, n:]).all()
            # the decision itself against the naive loop
            want = naive_change_point(ref.segment_scores.tolist())
            assert (int(out.release_segment[i]), bool(out.accepted[i])) == want[:2]
            if ref.change_point.accepted:
                n_accepted += 1
                r = ref.change_point.release_segment
                assert float(out.pre_mean[i]) == pytest.approx(float(ref.segment_scores[:r].mean()))
                assert float(out.post_mean[i]) == pytest.approx(
                    float(ref.segment_scores[r:].mean())
                )
            else:
                assert math.isnan(float(out.pre_mean[i])) and math.isnan(float(out.post_mean[i]))
        # no NaN from padding in anything that feeds the loss
        for name in ("weight", "keep_mask", "scale", "bic_gain"):
            assert not torch.isnan(getattr(out, name)).any(), name
        # mass preservation wherever something is kept
        kept = (mask * out.keep_mask).sum(1) > 0
        torch.testing.assert_close(out.weight.sum(1)[kept], mask.sum(1)[kept])
    assert n_accepted > 5


def test_batch_single_segment_and_empty_rows():
    b, t, k = 3, 6, 3
    seg_ids = torch.tensor([[0, 0, 0, 0, -1, -1], [-1] * 6, [0, 0, 1, 1, 2, 2]])
    mask = (seg_ids >= 0).float()
    lp = torch.full((b, t, k), float("nan"))
    lp[0, :4] = torch.tensor([-0.1, -5.0, -6.0])
    lp[2] = torch.tensor([-0.1, -0.2, -9.0])  # flat margins: nothing to release
    out = release_weights_batch(torch.ones(b, t), mask, lp, seg_ids)
    torch.testing.assert_close(out.weight, mask)
    assert out.num_segments.tolist() == [1, 0, 3]
    assert out.release_segment.tolist() == [1, 0, 3] and out.release_token.tolist() == [t, t, t]
    assert not out.accepted.any() and torch.equal(out.bic_gain, torch.zeros(b, dtype=torch.float64))
    assert torch.isfinite(out.scale).all() and out.scale[1] == 1.0
    assert out.segment_scores.shape == (3, 3) and torch.isnan(out.segment_scores[1]).all()


def test_batch_all_empty_and_zero_length():
    out = release_weights_batch(
        torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4, 2), torch.full((2, 4), -1)
    )
    assert torch.equal(out.weight, torch.zeros(2, 4)) and torch.isfinite(out.scale).all()
    assert out.segment_scores.shape == (2, 0)
    out = release_weights_batch(
        torch.zeros(2, 0),
        torch.zeros(2, 0),
        torch.zeros(2, 0, 2),
        torch.zeros(2, 0, dtype=torch.long),
    )
    assert out.weight.shape == (2, 0) and out.release_token.tolist() == [0, 0]


def test_batch_rejects_bad_input():
    seg = torch.tensor([[0, 0, 2, 2]])  # segment 1 missing
    with pytest.raises(ValueError):
        release_weights_batch(torch.zeros(1, 4), torch.ones(1, 4), torch.zeros(1, 4, 2), seg)
    with pytest.raises(ValueError):
        release_weights_batch(
            torch.zeros(1, 4), torch.ones(1, 4), None, torch.zeros(1, 4, dtype=torch.long)
        )
    with pytest.raises(ValueError):
        release_weights_batch(
            torch.zeros(1, 4),
            torch.ones(1, 4),
            torch.zeros(1, 4, 1),
            torch.zeros(1, 4, dtype=torch.long),
        )
    with pytest.raises(ValueError):
        release_weights_batch(
            torch.zeros(1, 4),
            torch.ones(1, 4),
            None,
            torch.zeros(1, 4, dtype=torch.long),
            signal="x",
        )


def test_batch_known_drop():
    # two samples, same sentences; only the first fades
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3, -1], [0, 0, 1, 1, 2, 2, 3, 3, -1]])
    mask = (seg >= 0).float()
    margins = torch.tensor([[4.0] * 4 + [0.0] * 4 + [0.0], [4.0] * 8 + [0.0]])
    lp = torch.stack([topk_with_margins(m, k=3) for m in margins])
    out = release_weights_batch(torch.ones(2, 9), mask, lp, seg)
    assert out.accepted.tolist() == [True, False]
    assert out.release_segment.tolist() == [2, 4] and out.release_token.tolist() == [4, 9]
    torch.testing.assert_close(out.weight[0], torch.tensor([2.0] * 4 + [0.0] * 5))
    torch.testing.assert_close(out.weight[1], mask[1])
    assert float(out.pre_mean[0]) == pytest.approx(math.log1p(4.0), rel=1e-6)
    assert float(out.post_mean[0]) == pytest.approx(0.0, abs=1e-9)
