"""math-verify in a worker process: ``python symbolic.py`` (needs the evaluator's packages).

One JSON request per stdin line, one JSON reply per stdout line (the first line says it is
ready). A request ``{"gold": g, "pred": p}`` asks math-verify whether the two answers are
equal (``{"eq": bool}``); ``{"pred": p, "value": true}`` asks for the numeric value of
``p`` (``{"value": {"rational": [p, q]}}``, ``{"value": {"float": "repr"}}`` or
``{"value": null}``) so that the evaluator compares numbers by its own rule. math-verify's
own timeouts are off (they need the main thread's signals); the evaluator kills this
process when an answer takes too long, wherever it runs the grading.
"""

import json
import os
import sys


def value_of(parsed):
    """The first sympy expression's value: exact when rational, else 50 significant digits."""
    import sympy

    for item in parsed:
        if not isinstance(item, sympy.Basic):
            continue
        item = item.doit()  # math-verify keeps sums like 1 - 1/10**20 unevaluated
        if item.is_Rational:
            return {"rational": [str(item.p), str(item.q)]}
        if item.is_number:
            c = sympy.N(item, 50)
            re_part, im_part = c.as_real_imag()
            if im_part == 0 or abs(im_part) <= abs(re_part) * sympy.Float("1e-40"):
                return {"float": str(sympy.Float(re_part, 50))}
        return None
    return None


def main():
    out = os.fdopen(os.dup(1), "w")  # the replies; whatever the libraries print goes to stderr
    sys.stdout = sys.stderr
    from math_verify import parse, verify

    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            pred = parse("\\boxed{" + req["pred"] + "}", parsing_timeout=None)
            if req.get("value"):
                reply = {"value": value_of(pred)}
            else:
                gold = parse("\\boxed{" + req["gold"] + "}", parsing_timeout=None)
                eq = bool(gold and pred and verify(gold, pred, timeout_seconds=None))
                reply = {"eq": eq}
        except Exception as e:  # noqa: BLE001 - a malformed answer is not equal to anything
            reply = {"error": repr(e)[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
