"""How sharply the toy teacher prefers among the student's candidates, sentence by sentence.

The measurement behind the toy's documented mechanism (README "The embedded toy"): on the
gold solutions of held-out problems, for every response token, the teacher's top-1 minus
top-2 log-prob among the student's top-K next-token candidates (the release rule's margin,
:func:`opd_lit.release.rule.teacher_margin`), averaged per sentence kind: the arithmetic
steps, the boxed answer, and each check line. Under ``free`` wording the check lines' words
are free choices and the margin collapses there; under ``fixed`` it does not.

CLI::

    python -m opd_lit.toy.contrast            # both wordings, 64 problems, K = 8
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch

from .task import check_lines, format_prompt

__all__ = ["sentence_margins", "main"]

KINDS = ("steps", "answer", "check 1", "check 2", "check 3")


def _kinds(solution: str) -> list[tuple[str, str]]:
    """(kind, text) of each sentence of a gold solution, in order."""
    head, _, _ = solution.partition(" The answer is ")
    steps = [s + "." for s in head.split(". ") if s]
    steps[-1] = steps[-1].rstrip(".") + "."
    answer = solution[len(head) :].split("}.", 1)[0].strip() + "}."
    checks = check_lines(solution)
    return [("steps", s) for s in steps] + [("answer", answer)] + [
        (f"check {i + 1}", c) for i, c in enumerate(checks)
    ]


@torch.inference_mode()
def sentence_margins(
    problems: Sequence[dict[str, Any]], student, teacher, tokenizers: dict[str, Any], k: int = 8
) -> dict[str, float]:
    """Mean teacher margin among the student's top-``k`` per sentence kind (nats).

    ``problems``: toy records (their ``wording`` decides the prompt and the solution);
    ``tokenizers``: the ``student`` and ``teacher`` tokenizers (same vocabulary, own chat
    templates). Returns ``{kind: mean margin over the tokens of that kind}``.
    """
    from opd_lit.release.rule import teacher_margin

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    eos = tokenizers["student"].convert_tokens_to_ids("<|im_end|>")
    for p in problems:
        pieces = _kinds(p["solution"])
        ids: list[int] = []
        kinds: list[str] = []
        text = ""
        for kind, sentence in pieces:  # sentence by sentence, as the solution text joins them
            piece = sentence if not text else " " + sentence
            new = tokenizers["student"](piece, add_special_tokens=False)["input_ids"]
            ids += new
            kinds += [kind] * len(new)
            text += piece
        assert text == p["solution"], (text, p["solution"])
        ids.append(eos)
        kinds.append(kinds[-1])
        resp = torch.tensor(ids)
        logps = {}
        for role, model in (("student", student), ("teacher", teacher)):
            prompt = tokenizers[role].apply_chat_template(
                format_prompt(p), add_generation_prompt=True, tokenize=False
            )
            prompt_ids = torch.tensor(tokenizers[role](prompt, add_special_tokens=False)["input_ids"])
            full = torch.cat([prompt_ids, resp]).unsqueeze(0)  # [1, P + T]
            logits = model(input_ids=full).logits[0, len(prompt_ids) - 1 : -1]  # [T, V]
            logps[role] = torch.log_softmax(logits.float(), dim=-1)
        cand = logps["student"].topk(k, dim=-1).indices  # [T, K]
        margin = teacher_margin(logps["teacher"].gather(-1, cand))  # [T]
        for kind, m in zip(kinds, margin.tolist()):
            sums[kind] = sums.get(kind, 0.0) + m
            counts[kind] = counts.get(kind, 0) + 1
    return {kind: sums[kind] / counts[kind] for kind in KINDS if kind in counts}


def _load(role: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .cache import toy_model_dir

    d = toy_model_dir(role)
    return AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opd_lit.toy.contrast", description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args(argv)
    from .recipe import toy_eval_problems

    (student, stok), (teacher, ttok) = _load("student"), _load("teacher")
    toks = {"student": stok, "teacher": ttok}
    print(f"teacher margin among the student's top-{args.k} (nats), gold solutions of "
          f"{args.problems} held-out problems")
    print(f"{'wording':8s} " + " ".join(f"{k:>8s}" for k in KINDS))
    for wording in ("free", "fixed"):
        m = sentence_margins(toy_eval_problems(args.problems, wording=wording), student, teacher, toks, args.k)
        print(f"{wording:8s} " + " ".join(f"{m[k]:8.2f}" if k in m else f"{'-':>8s}" for k in KINDS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
