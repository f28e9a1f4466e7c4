"""The candidate side of a function benchmark: ``serve.py REQUEST_FD REPLY_FD`` (in the jail).

Imports ``solution.py`` as the module ``solution`` (so ``__name__ != "__main__"`` and a
demo ``if __name__ == "__main__":`` block does not run), says whether that worked, then
answers calls (see :class:`wire.Caller`) until its requests end. Return values go back as
plain data (:mod:`wire`); other objects stay here and go back as handles. It holds no test
and no expected output: whatever the candidate does to this process, it can only change
what its own calls return.
"""

import os
import sys
import traceback
import types


def _error(e):
    lines = traceback.format_exception_only(type(e), e)
    return {"ok": False, "error": type(e).__name__, "message": "".join(lines).strip()[-400:]}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    import wire

    requests, replies = wire.Reader(int(sys.argv[1])), wire.Writer(int(sys.argv[2]))
    handles = []

    def ref(obj):
        handles.append(obj)
        return len(handles) - 1

    def unref(n):
        if isinstance(n, str):  # a global of the benchmark's setup code, which runs here too
            if n not in module.__dict__:
                raise wire.WireError(f"no global {n!r}")
            return module.__dict__[n]
        if not 0 <= n < len(handles):
            raise wire.WireError(f"no handle {n}")
        return handles[n]

    module = types.ModuleType("solution")
    module.__file__ = os.path.join(here, "solution.py")
    sys.modules["solution"] = module
    try:
        with open(module.__file__, encoding="utf-8") as f:
            code = compile(f.read(), module.__file__, "exec")
        exec(code, module.__dict__)
    except BaseException as e:  # noqa: BLE001 - SystemExit included: the import failed
        replies.send({"ready": False, "error": _error(e)["message"]})
        return
    replies.send({"ready": True})
    while True:
        request = requests.recv()
        if request is None:
            return
        try:
            target = request["target"]
            if "name" in target:
                name = target["name"]
                if name not in module.__dict__:
                    raise NameError(f"name {name!r} is not defined by the solution")
                obj = module.__dict__[name]
            else:
                obj = unref(target["handle"])
            if "attr" in target:
                obj = getattr(obj, target["attr"])
            args = [wire.decode(a, unref) for a in request["args"]]
            kwargs = {k: wire.decode(v, unref) for k, v in request["kwargs"].items()}
            reply = {"ok": True, "value": wire.encode(obj(*args, **kwargs), ref)}
        except BaseException as e:  # noqa: BLE001 - reported to the caller as a failed call
            reply = _error(e)
        replies.send(reply)


if __name__ == "__main__":
    main()
