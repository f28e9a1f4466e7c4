"""The graders against a human grader on the hand-labelled set in
tests/fixtures/eval/agreement (math, GPQA and code, realistic and hostile responses): no
false positive in any class, and the agreement figure that the README reports."""

import pytest

from opd_lit.eval.agreement import DEFAULT_DIR, format_report, load, run
from opd_lit.eval.sandbox import detect_isolation

JAIL = detect_isolation()


def test_the_set_is_large_and_covers_every_domain():
    cases, problems = load(DEFAULT_DIR)
    by_domain = {d: sum(c["domain"] == d for c in cases) for d in ("math", "gpqa", "code")}
    assert len(cases) >= 150 and min(by_domain.values()) >= 40, by_domain
    assert {c["problem"] for c in cases if c["domain"] == "code"} <= set(problems)
    assert len({c["id"] for c in cases}) == len(cases)
    # both labels in every domain, and hostile classes present
    for d in by_domain:
        assert {c["human"] for c in cases if c["domain"] == d} == {True, False}
    assert {"hostile", "hedge", "scientific", "percent", "truncated", "forge-exit", "read-tests"} <= {
        c["class"] for c in cases}


def test_math_and_gpqa_agree_with_the_human_labels():
    report = run(domains=("math", "gpqa"))
    print(format_report(report))
    assert report.total().fp == 0, format_report(report)
    for domain in ("math", "gpqa"):
        assert report.total(domain).rate >= 0.95, format_report(report)


@pytest.mark.slow
@pytest.mark.skipif(not JAIL.jailed, reason=f"code cases read host files unless jailed: {JAIL.reason}")
def test_code_agrees_with_the_human_labels():
    report = run(domains=("code",))
    print(format_report(report))
    assert report.total().fp == 0, format_report(report)
    assert report.total("code").rate >= 0.95, format_report(report)
