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
a built-in's subclass   ``{"m": [name, data]}``: its data, and a name for the object
anything else          ``{"h": n}``: a handle the sender keeps, or
                       ``{"g": name}``: a global both sides define
=====================  ==========================================

Decoding builds only these built-in types (handles, and the receiver's own mirror types for
``"m"``, through its hooks), so what a candidate returns is data: an object with a forged
``__eq__`` cannot cross. Depth and size are bounded.
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


_BASES = (bool, int, float, str, bytes, bytearray, complex, list, tuple, frozenset, set, dict)


def _plain(value, ref, d):
    """``value`` of an exact built-in type as data."""
    t = type(value)
    if value is None or t is str:
        return value
    if t is bool or t is float:
        return value
    if t is int:
        return value if -_BIG < value < _BIG else {"i": hex(value)}
    if t is list:
        return [encode(v, ref, d) for v in value]
    if t is tuple:
        return {"t": [encode(v, ref, d) for v in value]}
    if t is frozenset:
        return {"f": [encode(v, ref, d) for v in value]}
    if t is set:
        return {"s": [encode(v, ref, d) for v in value]}
    if t is dict:
        return {"d": [[encode(k, ref, d), encode(v, ref, d)] for k, v in value.items()]}
    if t is bytes or t is bytearray:
        return {"b": base64.b64encode(bytes(value)).decode("ascii")}
    if t is complex:
        return {"c": [value.real, value.imag]}
    return _NOT_PLAIN


_NOT_PLAIN = object()


def encode(value, ref=None, _depth=0):
    """``value`` as JSON-able data.

    ``ref(obj)`` names an object that is not of an exact built-in type: a handle (int) or
    the name of a global the receiver has too (str), or None to send its data alone. An
    instance of a subclass of a built-in (a namedtuple, a defaultdict) travels as both
    ``{"m": [name, data]}``; anything else needs a name."""
    if _depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    d = _depth + 1
    data = _plain(value, ref, d)
    if data is not _NOT_PLAIN:
        return data
    name = ref(value) if ref is not None else None
    base = next((b for b in _BASES if isinstance(value, b)), None)
    if base is not None:
        data = _plain(base(value), ref, d)
        return data if name is None else {"m": [name, data]}
    if name is None:
        raise WireError(f"cannot send a {type(value).__name__}")
    return {"g": name} if isinstance(name, str) else {"h": int(name)}


def decode(data, unref=None, mirror=None, _depth=0):
    """The value ``encode`` wrote. ``unref(name)`` resolves handles and globals (refused
    when None); ``{"m": [name, data]}`` gives ``mirror(value, name)`` when set, else
    ``unref(name)``, else the plain value."""
    if _depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    d = _depth + 1
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(v, unref, mirror, d) for v in data]
    if type(data) is not dict or len(data) != 1:
        raise WireError("malformed value")
    (tag, body), = data.items()
    try:
        if tag == "i" and type(body) is str:
            return int(body, 16)
        if tag in ("t", "s", "f") and type(body) is list:
            items = [decode(v, unref, mirror, d) for v in body]
            return {"t": tuple, "s": set, "f": frozenset}[tag](items)
        if tag == "d" and type(body) is list:
            out = {}
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise WireError("malformed dict item")
                out[decode(pair[0], unref, mirror, d)] = decode(pair[1], unref, mirror, d)
            return out
        if tag == "b" and type(body) is str:
            return base64.b64decode(body.encode("ascii"), validate=True)
        if tag == "c" and type(body) is list and len(body) == 2:
            return complex(float(body[0]), float(body[1]))
        if tag in ("h", "g") and type(body) is (int if tag == "h" else str) and unref is not None:
            return unref(body)
        if tag == "m" and type(body) is list and len(body) == 2 and type(body[0]) in (int, str):
            if mirror is not None:
                return mirror(decode(body[1], unref, mirror, d), body[0])
            if unref is not None:
                return unref(body[0])
            return decode(body[1], None, None, d)
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

    def __init__(self, requests: "Writer", replies: "Reader", unref=None, ref=None, mirror=None):
        self.requests, self.replies = requests, replies
        self.unref, self.ref, self.mirror = unref, ref, mirror
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
            return decode(reply.get("value"), self.unref, self.mirror)
        raise CandidateError(str(reply.get("message") or reply.get("error") or "the call failed")[:500])

    def _reply(self, timeout):
        message = self.replies.recv(timeout)
        if message is None:
            self.gone = "the candidate exited"
            raise CandidateError(self.gone)
        return message
