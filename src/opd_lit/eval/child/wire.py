"""Values and messages between the evaluator, the judge and the candidate (stdlib only).

A message is one JSON object on one line. A value is plain data, tagged where JSON has no
form of its own:

=====================  ==========================================
Python                 on the wire
=====================  ==========================================
None, bool, str        JSON
int                    JSON number (``{"i": hex}`` beyond 2**63)
float                  JSON number (``NaN``, ``Infinity`` allowed)
list                   JSON array
tuple / set            ``{"t": [...]}`` / ``{"s": [...]}``
frozenset              ``{"f": [...]}``
dict                   ``{"d": [[key, value], ...]}``
bytes                  ``{"b": base64}``
complex                ``{"c": [real, imag]}``
anything else          ``{"h": n}``: a handle the sender keeps
=====================  ==========================================

Decoding builds only these built-in types (and handles, through the receiver's
``unref``), so what a candidate returns is data: an object with a forged ``__eq__`` cannot
cross. Depth and size are bounded.
"""

import base64
import json
import os
import select
import time

MAX_LINE = 16 << 20  # bytes per message
MAX_DEPTH = 200
_BIG = 1 << 63


class WireError(ValueError):
    """A malformed or oversized message or value."""


def encode(value, ref=None, _depth=0):
    """``value`` as JSON-able data; ``ref(obj) -> int`` names what has no data form."""
    if _depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    d = _depth + 1
    if value is None or isinstance(value, (bool, str)):
        return bool(value) if isinstance(value, bool) else (None if value is None else str(value))
    if isinstance(value, int):
        value = int(value)
        return value if -_BIG < value < _BIG else {"i": hex(value)}
    if isinstance(value, float):
        return float(value)
    if isinstance(value, list):
        return [encode(v, ref, d) for v in value]
    if isinstance(value, tuple):
        return {"t": [encode(v, ref, d) for v in value]}
    if isinstance(value, frozenset):
        return {"f": [encode(v, ref, d) for v in value]}
    if isinstance(value, set):
        return {"s": [encode(v, ref, d) for v in value]}
    if isinstance(value, dict):
        return {"d": [[encode(k, ref, d), encode(v, ref, d)] for k, v in value.items()]}
    if isinstance(value, (bytes, bytearray)):
        return {"b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, complex):
        return {"c": [value.real, value.imag]}
    if ref is None:
        raise WireError(f"cannot send a {type(value).__name__}")
    return {"h": int(ref(value))}


def decode(data, unref=None, _depth=0):
    """The value ``encode`` wrote; ``unref(n)`` resolves handles (refused when None)."""
    if _depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    d = _depth + 1
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(v, unref, d) for v in data]
    if type(data) is not dict or len(data) != 1:
        raise WireError("malformed value")
    (tag, body), = data.items()
    try:
        if tag == "i" and type(body) is str:
            return int(body, 16)
        if tag in ("t", "s", "f") and type(body) is list:
            items = [decode(v, unref, d) for v in body]
            return {"t": tuple, "s": set, "f": frozenset}[tag](items)
        if tag == "d" and type(body) is list:
            out = {}
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise WireError("malformed dict item")
                out[decode(pair[0], unref, d)] = decode(pair[1], unref, d)
            return out
        if tag == "b" and type(body) is str:
            return base64.b64decode(body.encode("ascii"), validate=True)
        if tag == "c" and type(body) is list and len(body) == 2:
            return complex(float(body[0]), float(body[1]))
        if tag == "h" and type(body) is int and unref is not None:
            return unref(body)
    except WireError:
        raise
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise WireError(f"malformed value ({type(e).__name__}: {e})") from None
    raise WireError(f"malformed value (tag {tag!r})")


class Reader:
    """Messages from a file descriptor (a pipe), with an optional timeout per message."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""

    def recv(self, timeout=None):
        """The next message; None at end of file; ``TimeoutError`` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise WireError("message too long")
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError as e:
            raise WireError(f"not a JSON message ({e})") from None
        if type(message) is not dict:
            raise WireError("a message must be a JSON object")
        return message


class Writer:
    def __init__(self, fd):
        self.fd = fd

    def send(self, message):
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


class CandidateError(RuntimeError):
    """The candidate raised, could not be loaded, or went away."""


class Caller:
    """Calls into a candidate served by :mod:`serve`: ``call(target, args)`` -> value.

    ``target``: ``{"name": n}`` (a top-level name of the candidate), ``{"handle": h}`` (an
    object it returned), either with ``"attr": a`` to call that attribute.
    """

    def __init__(self, requests: "Writer", replies: "Reader", unref=None, ref=None):
        self.requests, self.replies = requests, replies
        self.unref, self.ref = unref, ref
        self.gone = None  # why the candidate can no longer answer

    def ready(self, timeout=None):
        message = self._reply(timeout)
        if not message.get("ready"):
            self.gone = f"the candidate did not load: {message.get('error', '?')}"
            raise CandidateError(self.gone)

    def call(self, target, args=(), kwargs=None, timeout=None):
        if self.gone:
            raise CandidateError(self.gone)
        request = {
            "target": target,
            "args": [encode(a, self.ref) for a in args],
            "kwargs": {str(k): encode(v, self.ref) for k, v in (kwargs or {}).items()},
        }
        try:
            self.requests.send(request)
        except OSError:
            self.gone = "the candidate exited"
            raise CandidateError(self.gone) from None
        reply = self._reply(timeout)
        if reply.get("ok") is True:
            return decode(reply.get("value"), self.unref)
        raise CandidateError(f"{reply.get('error', 'Error')}: {reply.get('message', '')}"[:500])

    def _reply(self, timeout):
        message = self.replies.recv(timeout)
        if message is None:
            self.gone = "the candidate exited"
            raise CandidateError(self.gone)
        return message
