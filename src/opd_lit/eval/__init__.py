"""Evaluation: benchmarks, graders, the code sandbox, the harness and the training callback.

- :mod:`opd_lit.eval.benchmarks`: benchmark specs (``conf/eval/*.yaml``), loaders with field
  mappings and bad-row reports, prompts and grading per task;
- :mod:`opd_lit.eval.graders`: math (math-verify), multiple choice, code extraction;
- :mod:`opd_lit.eval.sandbox` and :mod:`opd_lit.eval.programs`: running generated programs;
- :mod:`opd_lit.eval.harness`: generate or re-grade, score, metrics, per-sample records;
- :mod:`opd_lit.eval.callback`: ``EvalCallback`` for training; ``python -m opd_lit.evaluate``
  for a model on its own.
"""
