"""The trusted side of a function benchmark: ``judge.py REQUEST_FD REPLY_FD REPORT_FD``.

Reads its job (JSON) from stdin: ``nonce``, ``prelude`` (the benchmark's own code that the
tests expect: HumanEval's prompt with its helpers, MBPP's setup code; an object it defines
is passed to the candidate by name, for the candidate runs the same setup code), ``tests`` (a list of
code snippets, each one test) and ``call`` (an expression run after each snippet, e.g.
``check(candidate)``; empty for plain asserts). The tests run here, in this process, which
the candidate cannot see; every name a test uses that the prelude does not define is a
proxy that calls the candidate (``candidate`` is the entry point), so the candidate only
ever receives arguments and returns data. Each test's result goes to REPORT_FD, a pipe
only the evaluator reads, tagged with the nonce; the last message says the judge finished.
"""

import ast
import builtins
import importlib
import json
import os
import sys

# Modules a test may use without importing them (the in-process harnesses let the
# candidate's own imports leak into the tests; MBPP's asserts rely on that for math).
_MODULES = {
    "math", "cmath", "re", "string", "collections", "heapq", "itertools", "functools",
    "operator", "bisect", "statistics", "fractions", "decimal", "random", "sys", "typing",
    "datetime", "copy", "array", "numbers",
}


def main():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import wire

    job = json.loads(sys.stdin.read())
    report = wire.Writer(int(sys.argv[3]))
    nonce = job["nonce"]

    class Remote:
        """An object that lives in the candidate (a handle): it can be passed back to it
        and have its methods called, and nothing else (no truth value, no equality but
        identity)."""

        __slots__ = ("_id",)

        def __init__(self, n):
            self._id = n

        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return lambda *a, **k: caller.call({"handle": self._id, "attr": attr}, a, k)

        def __bool__(self):
            raise TypeError("an object of the candidate has no truth value here")

        def __repr__(self):
            return f"<candidate object {self._id}>"

    mirrors = {}

    def mirror(value, name):
        """A candidate's namedtuple, defaultdict...: its data (this process's own subclass
        of the built-in type, so equality is the built-in's), sent back as the original."""
        base = type(value)
        if base not in mirrors:
            mirrors[base] = type(f"Candidate{base.__name__.title()}", (base,), {})
        obj = mirrors[base](value)
        obj._opd_name = name
        return obj

    def ref(obj):
        if isinstance(obj, Remote):
            return obj._id
        if type(obj) in mirrors.values():
            return obj._opd_name
        # e.g. a tree MBPP's setup code builds: the candidate runs that code too
        return prelude_globals.get(id(obj))

    prelude_globals = {}
    caller = wire.Caller(wire.Writer(int(sys.argv[1])), wire.Reader(int(sys.argv[2])),
                         unref=Remote, ref=ref, mirror=mirror)

    def proxy(name):
        def call(*args, **kwargs):
            return caller.call({"name": name}, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call

    def send(message):
        report.send({"nonce": nonce, **message})

    try:
        caller.ready()
    except wire.CandidateError as e:
        send({"done": True, "loaded": False, "detail": str(e)[:500]})
        return
    env = {"__name__": "__judge__", "__builtins__": builtins}
    exec(compile(job.get("prelude") or "", "<prelude>", "exec"), env)
    prelude_globals.update({id(v): k for k, v in env.items() if not k.startswith("__")})
    entry = job.get("entry_point")
    if entry:
        env[entry] = env["candidate"] = proxy(entry)
    call = job.get("call") or ""
    for i, test in enumerate(job["tests"]):
        try:
            code = compile(test, f"<test {i}>", "exec")
            for node in ast.walk(ast.parse(test + "\n" + call)):
                if (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
                        and node.id not in env and not hasattr(builtins, node.id)):
                    env[node.id] = (importlib.import_module(node.id) if node.id in _MODULES
                                    else proxy(node.id))
            exec(code, env)
            if call:
                exec(compile(call, "<call>", "exec"), env)
            send({"test": i, "passed": True})
        except BaseException as e:  # noqa: BLE001 - a failed test, whatever it raised
            why = str(e) if isinstance(e, wire.CandidateError) else f"{type(e).__name__}: {e}"
            send({"test": i, "passed": False, "detail": why.rstrip(": ")[:300]})
    send({"done": True, "loaded": True})


if __name__ == "__main__":
    main()
