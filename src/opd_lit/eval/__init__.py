"""Evaluation: benchmarks, graders, the code sandbox, the harness and the training callback.

- :mod:`opd_lit.eval.benchmarks`: benchmark specs (``conf/eval/*.yaml``), loaders (by file
  suffix) with field mappings and bad-row reports, prompts and grading per task;
- :mod:`opd_lit.eval.graders`: math (numeric rules, then math-verify in a killable
  worker), multiple choice (one final answer or none), code extraction;
- :mod:`opd_lit.eval.sandbox`: the jail programs run in, and the refusal without one;
- :mod:`opd_lit.eval.programs`: code verdicts the candidate can neither read nor forge
  (with the child processes of :mod:`opd_lit.eval.child`);
- :mod:`opd_lit.eval.harness`: generate or re-grade, score, metrics, per-sample records;
- :mod:`opd_lit.eval.callback`: ``EvalCallback`` for training; ``python -m opd_lit.evaluate``
  for a model on its own;
- :mod:`opd_lit.eval.agreement`: the graders against a hand-labelled set.
"""
