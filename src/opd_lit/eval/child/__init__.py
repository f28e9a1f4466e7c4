"""Programs that run in the evaluator's child processes, standard library only.

- :mod:`~opd_lit.eval.child.init`: the sandbox's init (namespaces, the jail's file system,
  the unprivileged uid, resource limits), then the program;
- :mod:`~opd_lit.eval.child.serve`: the candidate side of a function benchmark (imports the
  candidate as a module and answers calls);
- :mod:`~opd_lit.eval.child.judge`: the trusted side (runs the benchmark's tests against the
  candidate's answers and reports each test's result);
- :mod:`~opd_lit.eval.child.wire`: the value codec and the line framing they share;
- :mod:`~opd_lit.eval.child.symbolic`: math-verify in a worker process (killable).

They run as scripts (``python -I -S <file>``; the math-verify worker with the evaluator's
packages), so none of them imports :mod:`opd_lit`.
"""
