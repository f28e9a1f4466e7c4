"""The defining property of each method (exopd, fixed_prefix, release_random, lgr), bad input,
and the base's top-K slicing; pure functions directly, methods on synthetic scored batches."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import random_rollout, tiny_qwen3

from opd_lit.batch import RolloutBatch, join_prompt_response
from opd_lit.lookahead import LookaheadResult, lookahead_max_prob_reference
from opd_lit.methods import (
    LGR,
    OPD,
    ExOPD,
    FixedPrefix,
    Lookahead,
    Needs,
    ReleaseBIC,
    ReleaseRandom,
)
from opd_lit.methods.functional import (
    exopd_advantage,
    permute_release_points,
    prefix_weight,
    scheduled_prefix_len,
    stratified_permutation,
)
from opd_lit.objectives import opd_advantage
from opd_lit.release import apply_release_tokens, release_weights_batch
from opd_lit.rollout.base import SamplingParams
from opd_lit.rollout.hf import HFEngine
from opd_lit.scoring import score_tokens
from opd_lit.teacher import TeacherModels

VOCAB = 67


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-student")
    tiny_qwen3(vocab=VOCAB, seed=0).save_pretrained(path)
    return str(path)


def make(cls, student_dir, **kwargs):
    return cls(student={"path": student_dir}, **kwargs)


def attach(module, step=0, max_steps=10, seed=0):
    module._trainer = SimpleNamespace(global_step=step, max_steps=max_steps, datamodule=SimpleNamespace(seed=seed))
    return module


def drop_segments(b, t, seg_len):
    """Teacher top-K log-probs with a decisive margin for ``seg_len[b]`` segments, then flat."""
    topk = torch.full((b, t, 4), -3.0)
    for i in range(b):
        cut = seg_len[i] * 4
        topk[i, :cut, 0] = -0.01
        topk[i, :cut, 1:] = -6.0
        topk[i, cut:, :2] = -1.0
        topk[i, cut:, 1] = -1.0 - 0.02 * torch.rand(t - cut)
    return topk


def synthetic_batch(b=4, p=5, t=24, k=4, seed=0, seg_len=None) -> RolloutBatch:
    """A scored rollout batch: tiny student/teacher, 4-token sentences, BIC-friendly margins."""
    student, teacher = tiny_qwen3(vocab=VOCAB, seed=0), tiny_qwen3(vocab=VOCAB, seed=1)
    pi, pm, _, _ = random_rollout(b, p, t, VOCAB, seed=seed)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t - 3 * (i % 2) - (i % 3) for i in range(b)])  # a few shorter rows
    rm = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()
    ri = torch.randint(1, VOCAB, (b, t), generator=g) * rm.long()
    ids, am = join_prompt_response(pi, pm, ri, rm)
    with torch.no_grad():
        s = score_tokens(student, ids, am, ri, rm, topk=k, entropy=True)
        tch = score_tokens(teacher, ids, am, ri, rm, gather_ids=s.topk_ids)
    positions = torch.arange(t).expand(b, t)
    seg = torch.where(rm > 0, positions // 4, torch.full_like(positions, -1))
    batch = RolloutBatch(
        records=[{"id": str(i)} for i in range(b)], prompt_ids=pi, prompt_mask=pm,
        response_ids=ri, response_mask=rm, student_logprobs=s.logprobs, student_topk_ids=s.topk_ids,
        student_entropy=s.entropy, teacher_prompt_ids=pi, teacher_prompt_mask=pm,
        group_ids=torch.arange(b), response_text=[""] * b,
        teacher_logprobs=tch.logprobs, teacher_topk_logprobs=tch.topk_logprobs,
        ref_logprobs=s.logprobs - 0.3 * torch.rand(b, t) * rm, segment_ids=seg,
    )
    if seg_len is not None:
        batch.teacher_topk_logprobs = drop_segments(b, t, seg_len)
    return batch


# ---------------------------------------------------------------------------
# exopd
# ---------------------------------------------------------------------------


def test_exopd_lambda_one_is_opd_exactly_and_lambda_zero_is_ref_minus_student():
    g = torch.Generator().manual_seed(0)
    t, r, s = (-5 * torch.rand(3, 7, generator=g) for _ in range(3))
    mask = (torch.rand(3, 7, generator=g) > 0.2).float()
    assert torch.equal(exopd_advantage(t, r, s, mask, 1.0), opd_advantage(t, s, mask))
    assert torch.equal(exopd_advantage(t, r, s, mask, 0.0), (r - s) * (mask > 0))
    expected = (1.25 * t - 0.25 * r - s) * mask
    assert torch.allclose(exopd_advantage(t, r, s, mask, 1.25), expected, atol=1e-6)


def test_exopd_module_matches_opd_at_lambda_one(student_dir):
    batch = synthetic_batch()
    ex = make(ExOPD, student_dir, lam=1.0)
    assert ex.needs.reference == "student_init" and ex.step_needs().topk == 8
    sup, ref = ex.supervise(batch), make(OPD, student_dir).supervise(batch)
    assert torch.equal(sup.advantage, ref.advantage) and torch.equal(sup.weight, ref.weight)
    assert sup.stats["exopd/ref_logp_mean"] < 0
    zero = make(ExOPD, student_dir, lam=0.0).supervise(batch)
    assert torch.equal(zero.advantage, (batch.ref_logprobs - batch.student_logprobs) * batch.response_mask)


def test_teacher_callback_scores_the_reference_on_the_student_view():
    batch = synthetic_batch(b=3)
    models = TeacherModels(tiny_qwen3(vocab=VOCAB, seed=1), tiny_qwen3(vocab=VOCAB, seed=5), micro_batch_size=2)
    batch.ref_logprobs = None
    models.score(batch, Needs(reference="student_init"))
    ids, am = batch.student_inputs()
    with torch.no_grad():
        want = score_tokens(models.reference, ids, am, batch.response_ids, batch.response_mask).logprobs
    assert torch.allclose(batch.ref_logprobs, want, atol=1e-6)


@pytest.mark.parametrize("lam", [-0.5, float("nan"), float("inf"), "high"])
def test_exopd_rejects_bad_lambda(lam):
    with pytest.raises(ValueError, match=r"method\.lam=.*finite number >= 0"):
        ExOPD(lam=lam)


def test_exopd_rejects_a_missing_reference(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=r"method\.reference=.*no-such-model.*does not exist.*student_init"):
        ExOPD(reference=str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"method\.reference=.*config\.json"):
        ExOPD(reference=str(tmp_path / "empty"))


# ---------------------------------------------------------------------------
# fixed_prefix
# ---------------------------------------------------------------------------


def test_prefix_weight_is_the_plain_prefix_mask_by_default_and_rescales_on_request():
    mask = torch.ones(3, 10)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    # §4.1: the standard OPD objective halted after L tokens, no rescaling
    plain, one = prefix_weight(mask, 4)
    assert torch.equal(plain, mask * (torch.arange(10) < 4)) and (one == 1).all()
    w, scale = prefix_weight(mask, 4, rescale=True)  # the named variant
    assert (w[:, 4:] == 0).all()
    assert torch.allclose(w.sum(-1), mask.sum(-1))  # rescaled: each sample keeps its loss mass
    assert scale.tolist() == [2.5, 1.5, 1.0]


def test_prefix_schedule_end_points():
    assert scheduled_prefix_len(0, 20, 8, 64, "linear") == 8
    assert scheduled_prefix_len(19, 20, 8, 64, "linear") == 64
    assert scheduled_prefix_len(25, 20, 8, 64, "linear") == 64
    mid = [scheduled_prefix_len(s, 20, 8, 64, "linear") for s in range(20)]
    assert mid == sorted(mid) and len(set(mid)) > 10
    assert scheduled_prefix_len(0, 20, 8, 64, "constant") == 64
    assert scheduled_prefix_len(0, 1, 8, 64, "linear") == 8


def test_fixed_prefix_module_weights_and_schedule(student_dir):
    batch = synthetic_batch()
    m = attach(make(FixedPrefix, student_dir, prefix_len=12, schedule="linear", start_len=4), step=0, max_steps=5)
    sup = m.supervise(batch)
    assert torch.equal(sup.weight, batch.response_mask * (torch.arange(24) < 4))  # no rescaling
    assert sup.stats["fixed_prefix/prefix_len"] == 4.0
    assert torch.equal(sup.advantage, make(OPD, student_dir).supervise(batch).advantage)
    attach(m, step=4, max_steps=5)
    sup = m.supervise(batch)
    assert torch.equal(sup.weight, batch.response_mask * (torch.arange(24) < 12))
    assert m.generation_limit(96) == 96  # truncation is off
    scaled = make(FixedPrefix, student_dir, prefix_len=12, rescale=True).supervise(batch)
    assert (scaled.weight[:, 12:] == 0).all()
    assert torch.allclose(scaled.weight.sum(-1), batch.response_mask.sum(-1))


def test_truncated_generation_stops_at_L(student_dir):
    m = make(FixedPrefix, student_dir, prefix_len=5, truncate_generation=True)
    assert m.generation_limit(96) == 5 and m.generation_limit(3) == 3
    engine = HFEngine(m.student, pad_id=0, eos_ids=[1], batch_size=4)
    torch.manual_seed(0)
    gen = engine.generate([[3, 4, 5], [7, 8]], 2, SamplingParams(max_new_tokens=m.generation_limit(96)))
    assert len(gen.response_ids) == 4 and max(len(r) for r in gen.response_ids) <= 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prefix_len": 0}, r"method\.prefix_len=0: allowed is an integer >= 1"),
        ({"prefix_len": -3}, r"method\.prefix_len=-3"),
        ({"prefix_len": 1.5}, r"method\.prefix_len=1\.5"),
        ({"prefix_len": 8, "schedule": "linear", "start_len": 16}, r"method\.start_len=16: allowed is 1 <= start_len <= method\.prefix_len=8"),
        ({"prefix_len": 8, "schedule": "linear"}, r"method\.start_len=None.*linear"),
        ({"schedule": "cosine"}, r"method\.schedule='cosine' is not one of \['constant', 'linear'\]"),
        ({"truncate_generation": "yes"}, r"method\.truncate_generation='yes': allowed is true or false"),
    ],
)
def test_fixed_prefix_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FixedPrefix(**kwargs)


# ---------------------------------------------------------------------------
# release_random
# ---------------------------------------------------------------------------


def lognormal_release_batch(b=1024, released=0.6, seed=0, t=16384, length_coupled=False):
    """Issue 16's synthetic batch: log-normal lengths (median 3000, sigma 0.8, within
    [32, t]), ``released`` of the samples released at a uniform 10-70% of their length
    (``length_coupled``: longer responses release relatively earlier, around 40% - 15% per
    sigma of log-length)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(3000) + 0.8 * torch.randn(b, generator=g)).round().clamp(32, t).long()
    hit = torch.rand(b, generator=g) < released
    if length_coupled:
        z = (lengths.double().log() - math.log(3000)) / 0.8
        frac = (0.4 - 0.15 * z + 0.1 * torch.randn(b, generator=g, dtype=torch.float64)).clamp(0.05, 0.95)
    else:
        frac = 0.1 + 0.6 * torch.rand(b, generator=g, dtype=torch.float64)
    release = torch.where(hit, (frac * lengths).floor().long().clamp_min(1), torch.full_like(lengths, t))
    return release, lengths


def fractions(release, lengths):
    """(released fraction of samples, kept fraction of tokens)."""
    kept = torch.minimum(release, lengths)
    return float((kept < lengths).float().mean()), float(kept.sum() / lengths.sum())


@pytest.mark.parametrize("length_coupled", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_release_keeps_the_released_and_the_kept_token_fractions(seed, length_coupled):
    release, lengths = lognormal_release_batch(seed=seed, length_coupled=length_coupled)
    released, kept = fractions(release, lengths)
    assert abs(released - 0.6) < 0.05
    g = torch.Generator().manual_seed(100 + seed)
    moved = permute_release_points(release, lengths, g)  # the default: relative, strata of 32
    assert fractions(moved, lengths)[0] == released  # exactly
    assert abs(fractions(moved, lengths)[1] - kept) < 0.005  # measured: within 0.4 points
    assert not torch.equal(moved, torch.minimum(release, lengths))  # the points did move
    # the first version (absolute positions over the whole batch, clipped) loses supervision
    old = permute_release_points(release, lengths, g, mode="absolute", stratum_size=None)
    old_released, old_kept = fractions(old, lengths)
    assert old_released < released - 0.04
    if not length_coupled:  # the batch: 60% released, 64% of the tokens kept
        assert abs(kept - 0.64) < 0.03 and old_kept < kept - 0.02


def test_random_release_relative_points_move_with_their_multiset_kept():
    release = torch.tensor([3, 17, 40, 40, 9, 64, 2, 5])
    lengths = torch.tensor([10, 20, 40, 50, 30, 64, 8, 16])
    g = torch.Generator().manual_seed(7)
    moved = permute_release_points(release, lengths, g, stratum_size=None)
    relative = torch.minimum(release, lengths).double() / lengths
    assert (moved >= 1).all() and (moved <= lengths).all()
    released = moved < lengths
    assert int(released.sum()) == int((release < lengths).sum())
    # every moved point is some sample's relative point on the new length (rounded)
    for b in range(8):
        if released[b]:
            assert any(abs(moved[b] - r * lengths[b]) <= 0.5 for r in relative.tolist() if r < 1)
    # a one-sample batch and samples too short to release keep their own point
    one = permute_release_points(release[:1], lengths[:1], torch.Generator().manual_seed(7))
    assert one.tolist() == [3]
    short = permute_release_points(torch.tensor([0, 5, 2]), torch.tensor([1, 10, 10]), g, stratum_size=None)
    assert short[0] == 1
    with pytest.raises(ValueError, match=r"method\.permute='tokens': allowed is one of \['relative', 'absolute'\]"):
        permute_release_points(release, lengths, g, mode="tokens")


def test_stratified_permutation_stays_within_length_strata():
    lengths = torch.tensor([5, 100, 6, 101, 7, 102, 8, 103])
    src = stratified_permutation(lengths, torch.Generator().manual_seed(0), stratum_size=4)
    assert sorted(src.tolist()) == list(range(8))
    short, long = {0, 2, 4, 6}, {1, 3, 5, 7}
    assert all((b in short) == (int(src[b]) in short) for b in range(8))
    assert all((b in long) == (int(src[b]) in long) for b in range(8))
    again = stratified_permutation(lengths, torch.Generator().manual_seed(0), stratum_size=4)
    assert torch.equal(src, again)  # a pure function of the lengths and the generator
    eligible = torch.tensor([True, True, False, True, True, True, True, True])
    assert stratified_permutation(lengths, torch.Generator().manual_seed(1), None, eligible)[2] == 2


def test_release_random_permutes_the_bic_release_points(student_dir):
    batch = synthetic_batch(b=4, seg_len=[1, 2, 3, 4])
    rand = attach(make(ReleaseRandom, student_dir, seed=3, permute="absolute", stratum_size=None))
    sup = rand.supervise(batch)
    rel = batch.release
    assert rel.accepted.all() and rel.release_token.tolist() == [4, 8, 12, 16]
    lengths = batch.response_mask.sum(-1)
    kept = [int((row > 0).sum()) for row in sup.weight]
    assert sorted(kept) == [4, 8, 12, 16] and kept != [4, 8, 12, 16]
    assert sup.stats["release_random/released_frac"] == 1.0
    assert torch.allclose(sup.weight.sum(-1), lengths)  # the usual mass-preserving rescale
    again = attach(make(ReleaseRandom, student_dir, seed=3, permute="absolute", stratum_size=None))
    assert torch.equal(again.supervise(synthetic_batch(b=4, seg_len=[1, 2, 3, 4])).weight, sup.weight)  # seeded
    # the default moves relative points: every sample released, at another sample's fraction
    relative = attach(make(ReleaseRandom, student_dir, seed=3)).supervise(synthetic_batch(b=4, seg_len=[1, 2, 3, 4]))
    assert relative.stats["release_random/released_frac"] == 1.0
    fracs = sorted(int((row > 0).sum()) / float(n) for row, n in zip(relative.weight, lengths))
    own = sorted(k / float(n) for k, n in zip([4, 8, 12, 16], lengths))
    assert all(abs(a - b) <= 0.5 / 18 for a, b in zip(fracs, own))


def test_release_random_with_one_sample_is_release_bic(student_dir):
    for seg_len in ([2], [5]):
        a, b = synthetic_batch(b=1, seg_len=seg_len), synthetic_batch(b=1, seg_len=seg_len)
        rand = attach(make(ReleaseRandom, student_dir), step=3).supervise(a)
        bic = make(ReleaseBIC, student_dir).supervise(b)
        assert torch.equal(rand.weight, bic.weight) and torch.equal(rand.advantage, bic.advantage)
        assert b.release.accepted.all()


def test_release_random_rejects_bad_input():
    with pytest.raises(ValueError, match=r"method\.seed=-1: allowed is null .* or an integer >= 0"):
        ReleaseRandom(seed=-1)
    with pytest.raises(ValueError, match=r"method\.permute='tokens': allowed is one of"):
        ReleaseRandom(permute="tokens")
    with pytest.raises(ValueError, match=r"method\.stratum_size=1: allowed is null .* or an integer >= 2"):
        ReleaseRandom(stratum_size=1)


# ---------------------------------------------------------------------------
# release.top_k / release.signal (Table 2) and the base's top-K slicing
# ---------------------------------------------------------------------------


def test_release_uses_its_own_top_k_when_needs_topk_is_larger(student_dir):
    lgr = make(LGR, student_dir, k=8, release={"top_k": 2})
    assert lgr.step_needs().topk == 8 and lgr.needs.lookahead == Lookahead(k=8, tau=0.2, segments=8)
    assert make(LGR, student_dir, k=2, release={"top_k": 4}).step_needs().topk == 4
    batch = synthetic_batch(k=8)
    rel = lgr.release_decision(batch)
    want = release_weights_batch(
        lgr.opd_advantage(batch), batch.response_mask, batch.teacher_topk_logprobs[..., :2], batch.segment_ids
    )
    assert torch.equal(rel.weight, want.weight) and torch.equal(rel.release_token, want.release_token)


@pytest.mark.parametrize("top_k, signal", [(4, "margin"), (16, "margin"), (2, "adv_std")])
def test_release_bic_variants(student_dir, top_k, signal):
    m = make(ReleaseBIC, student_dir, release={"top_k": top_k, "signal": signal})
    assert m.needs.topk == top_k and m.needs.segments and m.needs.release
    batch = synthetic_batch(k=top_k)
    sup = m.supervise(batch)
    want = release_weights_batch(
        m.opd_advantage(batch), batch.response_mask, batch.teacher_topk_logprobs, batch.segment_ids, signal=signal
    )
    assert torch.equal(sup.weight, want.weight)


# ---------------------------------------------------------------------------
# lgr
# ---------------------------------------------------------------------------


def lookahead_batch(k=4):
    batch = synthetic_batch(k=k)
    valid = batch.response_mask > 0
    # make every other sampled token one of the student's candidates (as sampling usually does)
    pick = batch.student_topk_ids[..., 1]
    every_other = (torch.arange(batch.response_ids.shape[1]) % 2 == 0) & valid
    batch.response_ids = torch.where(every_other, pick, batch.response_ids)
    teacher = tiny_qwen3(vocab=VOCAB, seed=1)
    ids, am = batch.teacher_inputs()
    tau = float(batch.student_entropy[valid].median())
    trig = (batch.student_entropy > tau) & valid
    r_raw = lookahead_max_prob_reference(teacher, ids, am, trig, batch.student_topk_ids)
    batch.lookahead = LookaheadResult(trig, r_raw, teacher_calls=2, branch_tokens=int(trig.sum()) * k)
    return batch


def test_lgr_adds_gamma_r_conf_of_the_sampled_token(student_dir):
    batch = lookahead_batch()
    look = batch.lookahead
    assert look.trigger.any() and not look.trigger[batch.response_mask > 0].all()
    opd = make(OPD, student_dir).supervise(batch).advantage
    sup = make(LGR, student_dir, k=4, gamma=0.5).supervise(batch)
    bonus = sup.advantage - opd
    assert (bonus[~look.trigger] == 0).all()
    for b, t in look.trigger.nonzero().tolist():
        r = look.r_raw[b, t]
        z = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
        match = batch.student_topk_ids[b, t] == batch.response_ids[b, t]
        want = 0.5 * float(z[match][0]) if match.any() else 0.0
        assert abs(float(bonus[b, t]) - want) < 1e-5
    assert torch.equal(sup.weight, batch.response_mask)
    assert sup.stats["lgr/teacher_calls"] == 2.0
    frac = float(look.trigger.sum() / batch.response_mask.sum())
    assert abs(sup.stats["lgr/trigger_frac"] - frac) < 1e-6 and sup.stats["lgr/r_conf_abs_mean"] > 0
    assert 0 < sup.stats["lgr/hit_frac"] < 1 and (bonus != 0).any()
    zero = make(LGR, student_dir, k=4, gamma=0.0).supervise(batch)
    assert torch.equal(zero.advantage, opd)


def test_lgr_topk_variant_hands_the_candidates_to_the_loss(student_dir):
    batch = lookahead_batch()
    sup = make(LGR, student_dir, k=4, gamma=2.0, variant="topk").supervise(batch)
    assert torch.equal(sup.advantage, make(OPD, student_dir).supervise(batch).advantage)
    look = batch.lookahead
    assert sup.candidate_k == 4 and "candidate_reward" in sup.checked
    assert (sup.candidate_reward[~look.trigger] == 0).all()
    r = sup.candidate_reward[look.trigger] / 2.0
    assert torch.allclose(r.mean(-1), torch.zeros(r.shape[0]), atol=1e-5)


def test_teacher_callback_fills_the_lookahead_with_one_prefill_per_micro_batch():
    batch = synthetic_batch(b=3, k=4)
    models = TeacherModels(tiny_qwen3(vocab=VOCAB, seed=1), micro_batch_size=2)
    teacher_lp = batch.teacher_logprobs.clone()
    tau = float(batch.student_entropy[batch.response_mask > 0].median())
    needs = Needs(topk=4, entropy=True, lookahead=Lookahead(k=3, tau=tau, segments=2))
    models.score(batch, needs)
    look = batch.lookahead
    ids, am = batch.teacher_inputs()
    trig = (batch.student_entropy > tau) & (batch.response_mask > 0)
    assert trig.any() and not trig[batch.response_mask > 0].all()
    assert torch.equal(look.trigger, trig)
    want = lookahead_max_prob_reference(models.teacher, ids, am, trig, batch.student_topk_ids[..., :3])
    assert torch.allclose(look.r_raw, want, atol=1e-4)
    assert torch.allclose(batch.teacher_logprobs, teacher_lp, atol=1e-6)
    # 2 micro-batches: 2 prefills + at most 2 branch forwards each
    assert 2 < look.teacher_calls <= 6 and look.branch_tokens == int(trig.sum()) * 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": -0.1}, r"method\.tau=-0\.1: allowed is a finite number >= 0"),
        ({"tau": float("nan")}, r"method\.tau=nan"),
        ({"gamma": -1.0}, r"method\.gamma=-1\.0: allowed is a finite number >= 0"),
        ({"gamma": float("inf")}, r"method\.gamma=inf"),
        ({"k": 1}, r"method\.k=1: allowed is an integer >= 2"),
        ({"segments": 0}, r"method\.segments=0: allowed is an integer >= 1"),
        ({"variant": "all"}, r"method\.variant='all' is not one of \['sampled', 'topk'\]"),
    ],
)
def test_lgr_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LGR(**kwargs)


def test_rescaling_is_the_release_rules_own(student_dir):
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    w, _ = prefix_weight(mask, 3, rescale=True)
    assert torch.equal(w, apply_release_tokens(mask, torch.tensor([3, 3]))[0])


# ---------------------------------------------------------------------------
# the conf: presets compose, bad values fail in build() before any model loads
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, prefix_len, truncate, rescale",
    [("fixed_prefix", 48, False, False), ("fixed_prefix_1024", 1024, False, False),
     ("fixed_prefix_2048", 2048, False, False), ("fixed_prefix_4096", 4096, False, False),
     ("fixed_prefix_8192", 8192, False, False), ("fastopd_2048", 2048, False, False),
     ("fastopd_2048_truncated", 2048, True, False), ("fixed_prefix_2048_rescaled", 2048, False, True)],
)
def test_fixed_prefix_presets_compose(tmp_path, preset, prefix_len, truncate, rescale):
    from e2e import compose_cfg

    cfg = compose_cfg(tmp_path, f"method={preset}")
    assert cfg.method.name == "fixed_prefix" and cfg.method._target_.endswith("FixedPrefix")
    assert cfg.method.prefix_len == prefix_len and cfg.method.truncate_generation is truncate
    assert cfg.method.rescale is rescale


def test_table3_fastopd_is_table1_fixed_prefix_2048(tmp_path):
    """§4.5: FastOPD's prefix 2048 is the main results' best-balanced setting, i.e. one method."""
    from e2e import compose_cfg

    fast = dict(compose_cfg(tmp_path, "method=fastopd_2048").method)
    table1 = dict(compose_cfg(tmp_path, "method=fixed_prefix_2048").method)
    assert fast.pop("label") == "FastOPD" and table1.pop("label") == "Fixed-prefix OPD-2048"
    assert fast == table1


def test_release_random_presets_compose(tmp_path):
    from e2e import compose_cfg

    default = compose_cfg(tmp_path, "method=release_random").method
    assert default.permute == "relative" and default.stratum_size == 32
    first = compose_cfg(tmp_path, "method=release_random_absolute").method
    assert first.permute == "absolute" and first.stratum_size is None and first.name == "release_random"


def test_every_method_config_names_its_class(tmp_path):
    from e2e import compose_cfg
    from hydra.utils import get_class

    from opd_lit.methods import METHODS

    for name in ("opd", "exopd", "fixed_prefix", "release_random", "release_bic", "lgr"):
        cfg = compose_cfg(tmp_path, f"method={name}")
        assert cfg.method.name == name and get_class(cfg.method._target_) is METHODS[name]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["method=exopd", "method.lam=-2"], r"method\.lam=-2: allowed is a finite number >= 0"),
        (["method=exopd", "method.reference=/no/such/model"], r"method\.reference='/no/such/model'"),
        (["method=lgr", "method.tau=-1"], r"method\.tau=-1: allowed"),
        (["method=lgr", "method.gamma=-0.5"], r"method\.gamma=-0\.5: allowed"),
        (["method=fixed_prefix", "method.prefix_len=0"], r"method\.prefix_len=0: allowed"),
        (["method=release_random", "method.seed=-3"], r"method\.seed=-3: allowed"),
    ],
)
def test_bad_method_config_fails_before_any_model_loads(tmp_path, overrides, match, monkeypatch):
    from e2e import compose_cfg

    import opd_lit.methods.base as base
    from opd_lit.train import build

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the method's keys were checked")

    monkeypatch.setattr(base, "load_causal_lm", no_loading)
    cfg = compose_cfg(tmp_path, *overrides)
    with pytest.raises(Exception, match=match):
        build(cfg, tmp_path)


# ---------------------------------------------------------------------------
# end to end on the toy (2 steps each; the default runs are in test_train.py)
# ---------------------------------------------------------------------------


def _toy_run(tmp_path, *overrides):
    from e2e import compose_cfg, mlflow_runs

    from opd_lit.train import run

    cfg = compose_cfg(tmp_path, *overrides, "eval.at_start=false", "eval.at_end=false")
    assert run(cfg)["steps"] == 2
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    (r,) = runs

    def history(name):
        return [m.value for m in sorted(client.get_metric_history(r.info.run_id, name), key=lambda m: m.step)]

    return history


@pytest.mark.slow
def test_fixed_prefix_truncated_linear_schedule_on_the_toy(tmp_path):
    history = _toy_run(
        tmp_path, "method=fixed_prefix", "method.prefix_len=10", "method.start_len=4",
        "method.schedule=linear", "method.truncate_generation=true",
    )
    assert history("fixed_prefix/prefix_len") == [4.0, 10.0]  # the schedule's end points
    lens = history("rollout/response_len_max")
    assert lens[0] <= 4 and lens[1] <= 10
    assert all(0.0 < k <= 1.0 for k in history("train/kept_frac"))


@pytest.mark.slow
def test_release_bic_table2_variant_on_the_toy(tmp_path):
    history = _toy_run(tmp_path, "method=release_bic", "release.signal=adv_std", "release.top_k=4")
    assert len(history("release/accepted_frac")) == 2
    assert all(0.0 < k <= 1.0 for k in history("train/kept_frac"))


@pytest.mark.slow
def test_lgr_topk_variant_with_a_larger_k_than_the_release_on_the_toy(tmp_path):
    history = _toy_run(tmp_path, "method=lgr", "method.variant=topk", "method.k=12", "release.top_k=4")
    assert len(history("release/accepted_frac")) == 2
    assert all(c >= 1 for c in history("lgr/teacher_calls"))
    assert all(0.0 <= f <= 1.0 for f in history("lgr/trigger_frac"))
    assert all(math.isfinite(v) for v in history("train/loss"))
