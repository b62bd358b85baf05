"""
The public HTTP API under ``/<tenant>/``.

Handlers stay thin: they parse and validate, call the coordinator, and render JSON. The kv routes, the hot
path, are served by :class:`KVResource`, a plain ``twisted.web`` leaf mounted in the tree, because Klein's
routing costs more than the rest of a cache read (see docs/PERFORMANCE.md). Every other route is a Klein
route on :class:`PublicAPI`.
"""

import base64
import binascii
import json
import re
import sys
from itertools import accumulate
from typing import Dict, Optional, Set
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..coordinator import ClockSkewed, Unavailable
from ..log import UnknownLevel
from ..log.service import LEVELS_CHANGED
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..store import EntryTooLarge
from .errors import NO_ROUTE_MESSAGE, APIError, bad_request, method_not_allowed, not_found, too_large, write_error
from ..privateapi import request_gone
from .kvops import Answer, KVOperations, entry_json, expected_error, json_key
from .limits import BULK, VALUE
from .site import json_bytes
from ..wire import MAX_KEY_BYTES

MAX_LIST_LIMIT = 10000
DEFAULT_LIST_LIMIT = 1000
MAX_TTL = 10 * 365 * 24 * 3600.0
MAX_BULK_OPERATIONS = 1000
#: A bulk answer carries at most this many times MAX_VALUE_SIZE of entries (as a bulk request may carry of
#: values): an answer is held whole until its client has read it, and 1000 gets of the largest values would
#: otherwise hold a GiB for each client that asks and does not read.
BULK_ANSWER_VALUES = 8
_ANSWER_TOO_LARGE = b'{"error":"answer_too_large"}'
_JSON = b"application/json"
#: A cursor is the base64url of a key's UTF-8: at most 1368 characters for the longest key (1024 bytes).
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,1368}\Z")


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % (name,))


# One decoder for every request: json.loads with an argument builds a new one each call.
_decode_strict = json.JSONDecoder(parse_constant=_reject_constant).decode


def _decode_json(text: str) -> object:
    """
    ``text`` as JSON, refusing the non-standard ``NaN`` and ``Infinity``. Plain ``json.loads`` when neither
    word appears: on PyPy only it has the fast native decoder (a decoder with options is pure Python, and much
    slower).
    """
    if "NaN" in text or "Infinity" in text:
        return _decode_strict(text)
    return json.loads(text)


def check_media_type(content_type: Optional[bytes]) -> None:
    """
    :raises APIError: 415 for a content type other than JSON (none given is taken as JSON), or JSON in a
        charset other than UTF-8 (the only one JSON has: RFC 8259, 8.1).
    """
    if content_type is not None:
        media, _, parameters = content_type.partition(b";")
        if media.strip().lower() != _JSON:
            raise APIError(415, "unsupported_media_type", "Send the body as application/json.")
        if parameters and not _utf8_charset(parameters):
            raise APIError(415, "unsupported_media_type", "Send the body as JSON in UTF-8.")


#: Charsets a JSON body may be labelled with: UTF-8, and ASCII, which is UTF-8 (RFC 8259, 8.1).
_UTF8_CHARSETS = frozenset([b"utf-8", b"utf8", b"us-ascii", b"ascii"])


def _utf8_charset(parameters: bytes) -> bool:
    """
    Whether a media type's ``parameters`` (after its first ``;``) name no charset, or one whose text is UTF-8.
    """
    for parameter in parameters.split(b";"):
        name, _, value = parameter.partition(b"=")
        if name.strip().lower() == b"charset" and value.strip().strip(b'"').lower() not in _UTF8_CHARSETS:
            return False
    return True


#: Conditional request headers: a write replaces whatever the key holds, and the newest write wins; there are no
#: entity tags or modification times to hold a condition to, and no atomic check across the key's replicas. A
#: write that carries one is refused, not done as if it had none (``If-None-Match: *`` is "create only").
_PRECONDITIONS = (b"if-match", b"if-none-match", b"if-unmodified-since")


def check_write_headers(request, body: bool = True) -> None:
    """
    What a write's request head must not carry: a precondition; and, for a write with a body, a content coding
    or two Content-Types.

    :raises APIError: 400 or 415.
    """
    headers = request.requestHeaders
    for name in _PRECONDITIONS:
        if headers.hasHeader(name):
            raise bad_request("unsupported_precondition", "Conditional writes (%s) are not supported: a write "
                              "replaces whatever the key holds." % (name.decode("ascii").title(),))
    if not body:
        return
    for value in headers.getRawHeaders(b"content-encoding") or ():
        if any(coding.strip().lower() not in (b"", b"identity") for coding in value.split(b",")):
            raise APIError(415, "unsupported_media_type", "Send the body with no Content-Encoding.")
    if len(headers.getRawHeaders(b"content-type") or ()) > 1:
        raise bad_request("invalid_header", "Send one Content-Type.")


def parse_json(body: bytes, content_type: Optional[bytes]) -> object:
    """
    A request body as JSON.

    :raises APIError: 415 for a content type other than JSON, 400 for malformed JSON.
    """
    check_media_type(content_type)
    try:
        text = body.decode("utf-8")
        return _decode_json(text)
    except UnicodeDecodeError:
        raise bad_request("invalid_json", "The body is not valid UTF-8.")
    except RecursionError:
        raise bad_request("invalid_json", "The body is nested too deeply.")
    except ValueError as error:
        # Said the same on every interpreter: PyPy's decoder names a NUL it reads past the end of a cut-off body.
        if not text.strip():
            raise bad_request("invalid_json", "The body is empty: send JSON.")
        position = getattr(error, "pos", None)
        if position is None and "integer string conversion" in str(error):
            # Valid JSON, but Python converts no integer of more digits (sys.get_int_max_str_digits): the
            # conversion's time grows with the square of them.
            raise bad_request("invalid_json", "The body has an integer of more than %d digits; send it as a "
                              "string." % (sys.get_int_max_str_digits(),))
        if isinstance(position, int):
            raise bad_request("invalid_json", "The body is not valid JSON (at character %d of %d)." % (
                position, len(text)))
        raise bad_request("invalid_json", "The body is not valid JSON.")


def parse_json_body(request) -> object:
    """
    The body of a Twisted ``request`` as JSON (see :func:`parse_json`).
    """
    return parse_json(request.content.read(), request.getHeader(b"content-type"))


#: How deep a PUT's value may nest (arrays and objects within each other). Deeper, the parser's own recursion
#: limit decided, and it depends on how deep the stack already was: the fast lane and Twisted's server refused at
#: depths ten apart.
MAX_VALUE_DEPTH = 500
#: +1 for an opening bracket, -1 for a closing one, by byte.
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")


def _check_depth(body: bytes, levels: int = MAX_VALUE_DEPTH + 1) -> None:
    """
    :param levels: how deep ``body`` may nest: a PUT's (``{"value": ...}``) one level more than its value.
    :raises APIError: 400 if it nests deeper.

    Linear in the body's size, whatever it holds: the strings are cut out by splitting on the quotes left once
    the escaped backslashes and quotes are gone (a regular expression over the strings backtracked, taking
    minutes over a body of escaped quotes), and the depth is a running sum over the brackets outside them.
    """
    if body.count(b"[") + body.count(b"{") <= levels:
        return  # too few brackets to nest that deep: the usual body, at the cost of two counts
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[0::2]).translate(None, _NOT_BRACKETS)
    if max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > levels:
        raise bad_request("invalid_json", "The value is nested deeper than %d levels." % (MAX_VALUE_DEPTH,))


def parse_put(body: bytes, content_type: Optional[bytes]) -> tuple:
    """
    The serialized value and the TTL of a kv PUT's raw body.
    """
    # The media type first: a body that is not JSON gets 415 whatever brackets it holds.
    check_media_type(content_type)
    _check_depth(body)
    return parse_write(parse_json(body, None))


def parse_key(raw: bytes, limit: int = 250) -> str:
    """
    A key from its (already percent-decoded) path bytes.

    :raises APIError: 400 if it is empty, not UTF-8 or longer than ``limit`` characters (MAX_KEY_LENGTH).
    """
    # A code point takes at most 4 bytes: a longer path is refused before it is decoded.
    if len(raw) > 4 * limit:
        raise _too_long(limit)
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("invalid_key", "The key is not valid UTF-8.")
    return _within(key, limit)


def validate_key(key, limit: int = 250) -> str:
    """
    A key from a JSON body (bulk).

    :raises APIError: 400 if it is not a string, empty, longer than ``limit`` characters, or holds a lone
        surrogate (no UTF-8 form).
    """
    if not isinstance(key, str):
        raise bad_request("invalid_key", "Keys must be strings.")
    _within(key, limit)
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("invalid_key", "The key is not valid UTF-8.")
    return key


def _within(key: str, limit: int) -> str:
    if not key:
        raise bad_request("invalid_key", "The key must not be empty.")
    if len(key) > limit:
        raise _too_long(limit)
    return key


def _too_long(limit: int) -> Exception:
    # The limit counts characters (code points), as JSON Schema's maxLength does, so that the published
    # description (Key: maxLength) and this check agree on every key.
    return bad_request("invalid_key", "The key is longer than %d characters." % (limit,))


def parse_write(body, put_of_bulk: bool = False) -> tuple:
    """
    The serialized value and the TTL of a PUT body ``{"value": ..., "ttl": ...}``.

    :param put_of_bulk: ``body`` is a bulk put's fields without its key: the errors name a put's fields.
    """
    if type(body) is dict and len(body) == 1:
        # The usual write: a value and nothing else; a plain string is quoted as it is (see serialize_value).
        try:
            return serialize_value(body["value"]), None
        except KeyError:
            pass
    if not isinstance(body, dict):
        raise bad_request("invalid_body", "The body must be a JSON object with a \"value\".")
    unknown = set(body) - {"value", "ttl"}
    if unknown:
        raise bad_request("invalid_body", "Unknown field %s; %s." % (
            json.dumps(sorted(unknown)[0]),
            "a put takes \"key\", \"value\" and \"ttl\"" if put_of_bulk else "a write takes \"value\" and \"ttl\""))
    if "value" not in body:
        raise bad_request("missing_value", "Each put must have a \"value\"." if put_of_bulk else
                          "The body must have a \"value\".")
    ttl = body.get("ttl")
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL:
            raise bad_request("invalid_ttl", "ttl must be a number of seconds above 0 and at most %d."
                              % (MAX_TTL,))
        ttl = float(ttl)
    return serialize_value(body["value"]), ttl


def serialize_value(value) -> bytes:
    """
    ``value`` as the JSON a write stores. A printable ASCII string with nothing to escape (the common value of
    a cache) is quoted as it is, which is what the encoder gives for it.

    :raises APIError: 400 if it has no JSON form (NaN, infinities, nesting too deep).
    """
    if (type(value) is str and value.isascii() and value.isprintable() and '"' not in value
            and "\\" not in value):
        return b'"' + value.encode("ascii") + b'"'
    try:
        return _encode_value(value).encode("utf-8")
    except (ValueError, RecursionError):
        raise bad_request("invalid_body", "The value cannot be stored as JSON.")


# One encoder for every value a bulk write stores: json.dumps with arguments builds a new one at each call.
_encode_value = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def parse_bulk_put(item, limit: int, check_fits) -> tuple:
    """
    ``(key, serialized value, ttl)`` of one put of a bulk body, ``{"key": ..., "value": ..., "ttl": ...}``:
    the checks and errors of :func:`validate_key` and :func:`parse_write`, then ``check_fits`` (a store's).

    The usual put, an ASCII key and a value with no TTL, takes a shorter way to the same result: it builds
    no second dict without the key, and a printable ASCII string value (the common value of a cache) is quoted
    as it is, with nothing in it to escape. A bulk request holds up to MAX_BULK_OPERATIONS of these.

    :raises APIError: 400 for a malformed put, 413 for an entry larger than the memory budget.
    """
    if type(item) is dict and len(item) == 2 and "value" in item:
        key = item.get("key")
        # An ASCII key has a UTF-8 form, and its length in characters is its length in bytes.
        if type(key) is str and 0 < len(key) <= limit and key.isascii():
            return key, _fitting(check_fits, key, serialize_value(item["value"])), None
    if not isinstance(item, dict) or "key" not in item:
        raise bad_request("invalid_body", "Each put is {\"key\", \"value\", \"ttl\"}.")
    key = validate_key(item["key"], limit)
    value, ttl = parse_write({k: v for k, v in item.items() if k != "key"}, put_of_bulk=True)
    return key, _fitting(check_fits, key, value, ttl), ttl


def _each(items: list, name: str, parse) -> list:
    """
    ``parse`` of each of a bulk body's ``items`` (its ``name`` list); an error names the item it is about
    (``put[3]: ...``): a request of up to a thousand operations is refused whole for one of them.
    """
    parsed = []
    for index, item in enumerate(items):
        try:
            parsed.append(parse(item))
        except APIError as error:
            raise APIError(error.status, error.code, "%s[%d]: %s" % (name, index, error.message), error.headers)
    return parsed


def _fitting(check_fits, key: str, value: bytes, ttl: Optional[float] = None) -> bytes:
    try:
        check_fits(key, value, ttl)
    except EntryTooLarge:
        raise too_large("An entry is larger than the whole memory budget.")
    return value


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> str:
    if not _CURSOR.match(cursor):
        raise bad_request("invalid_cursor", "The cursor is not one this API returned.")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise bad_request("invalid_cursor", "The cursor is not one this API returned.")


def _write_json(request, status: int, body: bytes, headers=()) -> None:
    if request.finished or request_gone(request):
        return
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", _JSON)
    for name, value in headers:
        request.setHeader(name, value)
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    write_body = getattr(request, "write_body", None)
    if write_body is not None:
        write_body(body)
        return
    request.write(body)
    request.finish()


def failure_body(request, failure) -> Optional[bytes]:
    """
    The JSON error body for an expected failure (with status and headers set), or ``None`` after
    answering an unexpected one with a bare 500; ``None`` too, quietly, for the work cancelled because its client
    hung up (Klein cancels a route's Deferred then: a peer that gave up waiting), where nothing went wrong.
    """
    if failure.check(CancelledError) and request_gone(request):
        return None
    error = expected_error(failure)
    if error is None:
        request.processingFailed(failure)
        return None
    return write_error(request, error)


def _write_answer(request, answer: Answer) -> None:
    _write_json(request, answer.status, answer.body, answer.headers)


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 6)


def _write_failure(request, failure) -> None:
    if request.finished or request_gone(request):
        return
    body = failure_body(request, failure)
    if body is None or request.finished:
        return
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


class KVResource(Resource):
    """
    ``/<tenant>/kv`` (list) and ``/<tenant>/kv/<key>`` (GET, HEAD, PUT, DELETE): a lean leaf, carrying
    :class:`~kvresponder.http.kvops.KVOperations`' answers in Twisted's ``Request`` (the requests that
    :mod:`~kvresponder.http.fastlane` does not take).
    """

    isLeaf = True

    def __init__(self, node) -> None:
        Resource.__init__(self)
        self._coordinator = node.coordinator
        self.operations = KVOperations(node, parse_key, parse_put)

    def render(self, request):
        postpath = request.postpath
        method = request.method
        operations = self.operations
        try:
            if not postpath or postpath == [b""]:
                if method not in (b"GET", b"HEAD"):
                    raise method_not_allowed(["GET", "HEAD"])
                with request.begin("/kv", read=True):
                    return self._list(request)
            key = operations.key(b"/".join(postpath))
            if method in (b"GET", b"HEAD"):
                with request.begin("/kv/{key}", read=True):
                    return self._answer(request, operations.get(key))
            if method == b"PUT":
                with request.begin("/kv/{key}", kv_write=True):
                    check_write_headers(request)
                    return self._answer(request, operations.put(
                        key, request.content.read(), request.getHeader(b"content-type")))
            if method == b"DELETE":
                with request.begin("/kv/{key}", kv_write=True):
                    check_write_headers(request, body=False)
                    return self._answer(request, operations.delete(key))
            raise method_not_allowed(["GET", "HEAD", "PUT", "DELETE"])
        except APIError as error:
            if request.route == "unmatched":
                # The list's route (``/kv`` and ``/kv/``) takes a PUT or DELETE too: a 405 counts under it.
                request.name_route("/kv" if not postpath or postpath == [b""] else "/kv/{key}")
            return write_error(request, error)

    def _answer(self, request, answer):
        if isinstance(answer, Answer) and request.method == b"GET":
            # Answered at once: Twisted frames the returned body. A HEAD goes through _write_answer, which
            # Twisted sends bodiless.
            self._set(request, answer)
            return answer.body
        if isinstance(answer, Answer):
            _write_answer(request, answer)
        else:
            answer.addCallback(lambda answer: _write_answer(request, answer))
        return NOT_DONE_YET

    def _respond(self, request, d: Deferred, render) -> object:
        d.addCallback(render)
        d.addErrback(lambda failure: _write_failure(request, failure))
        return NOT_DONE_YET

    @staticmethod
    def _set(request, answer: Answer) -> None:
        request.setResponseCode(answer.status)
        request.setHeader(b"Content-Type", _JSON)
        for name, value in answer.headers:
            request.setHeader(name, value)

    def _list(self, request):
        args = _query_args(request.uri, _LIST_PARAMETERS)
        prefix = _text_arg(args, b"prefix", "")
        limit_text = _text_arg(args, b"limit", None)
        cursor = _text_arg(args, b"cursor", None)
        if limit_text is None:
            limit = DEFAULT_LIST_LIMIT
        else:
            # Plain ASCII digits only: int() would also take "1_0", " 2" and other scripts' digits.
            digits = limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 9
            limit = int(limit_text) if digits else 0
            if not 1 <= limit <= MAX_LIST_LIMIT:
                raise bad_request("invalid_limit", "limit must be an integer from 1 to %d." % (MAX_LIST_LIMIT,))
        after = decode_cursor(cursor) if cursor else None
        if after is not None and len(after.encode("utf-8")) > MAX_KEY_BYTES:
            # The base64 of no key's: what peers would refuse to list after (a cluster would answer 503).
            raise bad_request("invalid_cursor", "The cursor is not one this API returned.")

        def render(result):
            keys, more = result
            _write_json(request, 200, json_bytes({
                "keys": keys, "count": len(keys),
                "next": encode_cursor(keys[-1]) if more and keys else None}))

        return self._respond(request, ensureDeferred(self._coordinator.list_keys(prefix, after, limit)), render)


_LIST_PARAMETERS = frozenset([b"prefix", b"limit", b"cursor"])


def _query_args(uri: bytes, names) -> Dict[bytes, bytes]:
    """
    A request target's query parameters among ``names``, each given at most once. Split on ``&`` alone
    (Twisted's ``request.args`` splits on ``;`` too, which URLs do not: ``prefix=a;b`` is the prefix ``a;b``),
    and decoded as a form's are (``+`` is a space). As Twisted's were, a part without ``=`` is left out, and so
    is any parameter the route does not take (a cache-buster), however often it is given.

    :raises APIError: 400 for one of ``names`` given twice (which of them to take would be a guess).
    """
    mark = uri.find(b"?")
    args: Dict[bytes, bytes] = {}
    if mark < 0:
        return args
    for part in uri[mark + 1:].split(b"&"):
        name, equals, value = part.partition(b"=")
        if not equals:
            continue
        name = unquote_to_bytes(name.replace(b"+", b" "))
        if name not in names:
            continue
        if name in args:
            raise bad_request("invalid_query", "Give each query parameter at most once.")
        args[name] = unquote_to_bytes(value.replace(b"+", b" "))
    return args


def _text_arg(args: Dict[bytes, bytes], name: bytes, default):
    value = args.get(name)
    if value is None:
        return default
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("invalid_query", "Query parameters must be UTF-8.")


#: Each public route's methods, by path, as registered. The router matches a method whatever its case, but
#: methods are case-sensitive (RFC 9110, 9.1): ``put`` is no method of any route's, and answers 405 with these.
_METHODS: Dict[str, Set[str]] = {}


def exact_method(path: str, methods):
    """
    A check for the handler of ``path``'s route for ``methods``: ``None`` if the request's method is one of the
    path's as spelled, else the 405 to answer.
    """
    _METHODS.setdefault(path, set()).update(methods)
    spelled = frozenset(method.encode("ascii") for method in methods)

    def check(request) -> Optional[APIError]:
        if request.method in spelled:
            return None
        return method_not_allowed(sorted(_METHODS[path]))
    return check


def json_route(app: Klein, path: str, methods, read: bool = False):
    """
    A Klein route whose handler returns a JSON-able value (or a Deferred of one, or ``(status, value)``),
    with route accounting, Eliot action and JSON errors.
    """
    def decorator(function):
        refusal = exact_method(path, methods)

        def handler(self, request, **kwargs):
            refused = refusal(request)
            if refused is not None:
                request.name_route("unmatched")
                return write_error(request, unauthorized_admin(self._node.admin, request) or refused)
            with request.begin(path, read=read):
                try:
                    result = function(self, request, **kwargs)
                except APIError as error:
                    return write_error(request, error)
                if isinstance(result, Deferred) or hasattr(result, "__await__"):
                    # Klein waits for a Deferred and writes the bytes it fires with; it must not be
                    # handed NOT_DONE_YET, which it would answer at once with an empty page.
                    d = ensureDeferred(result) if not isinstance(result, Deferred) else result
                    d.addCallback(lambda value: render_value(request, value))
                    d.addErrback(lambda failure: failure_body(request, failure))
                    return d
                return render_value(request, result)
        handler.__name__ = function.__name__
        handler.__doc__ = function.__doc__
        return app.route(path, methods=methods, strict_slashes=False)(handler)
    return decorator


def render_value(request, result) -> bytes:
    status = 200
    if isinstance(result, tuple):
        status, result = result
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", _JSON)
    return result if isinstance(result, bytes) else json_bytes(result)


def handle_routing_errors(app: Klein) -> None:
    """
    Klein's routing failures (no route, wrong method) as JSON errors. Paths are taken as they are: no
    slash merging, whose redirects would point clients at a host name they sent.
    """
    app.url_map.merge_slashes = False
    @app.handle_errors(HTTPException)
    def routing_error(self, request, failure):
        error = failure.value
        if isinstance(error, MethodNotAllowed):
            api_error = method_not_allowed(sorted(error.valid_methods or []))
        else:
            # Not found; and anything else the router raises (a redirect, a bad request) is not a route of ours.
            api_error = not_found(NO_ROUTE_MESSAGE)
        request.name_route("unmatched")
        return write_error(request, unauthorized_admin(self._node.admin, request) or api_error)


def unauthorized_admin(admin, request) -> Optional[APIError]:
    """
    For a request under ``/<tenant>/admin`` without the admin token (once one is set), the 401 to answer before a
    404 or a 405, which would tell a caller without it which admin routes and methods there are; else ``None``.
    """
    # The path under /<tenant>/, decoded as the router decodes it (%61dmin is admin).
    below = unquote_to_bytes(request.path.split(b"?", 1)[0]).split(b"/", 2)[2:]
    if not below or not (below[0] == b"admin" or below[0].startswith(b"admin/")):
        return None
    try:
        admin.authorize(request, write=False)
    except APIError as error:
        return error if error.status == 401 else None
    return None


class PublicAPI:
    """
    The public routes other than kv: health, peers, metrics, diag, admin, bulk.

    :param node: the :class:`~kvresponder.node.Node` served.
    """

    app = Klein()

    def __init__(self, node) -> None:
        self._node = node
        self._limits = {}

    def resource(self):
        return self.app.resource()

    #: The body limit of each route that has a larger one than a value's.
    BODY_LIMITS = {"bulk": BULK}

    def body_limit_for(self, segments, method: bytes) -> str:
        """
        The body limit of the route that Klein matches for the decoded path ``segments`` below the tenant
        and ``method``: the same path Klein builds from the request's ``postpath``, against the same rules.
        """
        path = b"/".join(segments)
        if not path.startswith(b"/"):
            path = b"/" + path
        # Werkzeug's match costs more than the rest of a small request: each path and method is matched once (a
        # client uses a few).
        cached = self._limits.get((path, method))
        if cached is not None:
            return cached
        try:
            rule, _ = self.app.url_map.bind("localhost", path_info=path.decode("utf-8"),
                                            default_method=method.decode("utf-8")).match(return_rule=True)
            limit = self.BODY_LIMITS.get(rule.endpoint, VALUE)
        except (HTTPException, UnicodeDecodeError):
            limit = VALUE
        if len(self._limits) >= 256:
            self._limits.clear()
        self._limits[(path, method)] = limit
        return limit

    @json_route(app, "/health", ["GET", "HEAD"], read=True)
    def health(self, request):
        return self._node.health()

    @json_route(app, "/health/live", ["GET", "HEAD"], read=True)
    def live(self, request):
        """
        Liveness: 200 while the reactor turns. Kubernetes restarts the pod when this fails.
        """
        return self.liveness()

    @json_route(app, "/health/ready", ["GET", "HEAD"], read=True)
    def ready(self, request):
        """
        Readiness: 200 once the node has joined and loaded its share; 503 while starting or draining, so
        Kubernetes routes no client to it.
        """
        return self.readiness()

    def liveness(self):
        return 200, {"status": "alive", "node": self._node.node_id}

    def readiness(self):
        state = self._node.readiness()
        return (200 if state == "ready" else 503), {"status": state, "node": self._node.node_id}

    def probes(self):
        """
        The probes' routes (below the tenant) and their answers, ``(status, JSON-able)``: what a connection over
        the cap is still answered (:class:`~kvresponder.http.site.KVSite`), for the kubelet must not restart a
        busy node, nor send it clients by a stale answer.
        """
        return {"/health/live": self.liveness, "/health/ready": self.readiness}

    @json_route(app, "/peers", ["GET", "HEAD"], read=True)
    def peers(self, request):
        now = self._node.clock.seconds()
        clock = self._node.clock_offsets
        return [dict(peer.as_json(now), clock_offset_s=_rounded(clock.offset(peer.node_id)))
                for peer in self._node.membership.peers()]

    @app.route("/metrics", methods=["GET", "HEAD"], strict_slashes=False)
    def metrics(self, request, _refusal=exact_method("/metrics", ["GET", "HEAD"])):
        refused = _refusal(request)
        if refused is not None:
            request.name_route("unmatched")
            return write_error(request, refused)
        with request.begin("/metrics", read=True):
            request.setHeader(b"Content-Type", METRICS_CONTENT_TYPE.encode("ascii"))
            return self._node.metrics.exposition()

    @json_route(app, "/diag", ["GET", "HEAD"], read=True)
    def diag(self, request):
        return self._node.diag()

    @json_route(app, "/openapi.json", ["GET", "HEAD"], read=True)
    def openapi(self, request):
        from .openapi import spec_for
        settings = self._node.settings
        return spec_for(settings.tenant, settings.max_key_length)

    @json_route(app, "/admin/log-levels", ["GET", "HEAD"], read=True)
    def get_log_levels(self, request):
        self._node.admin.authorize(request, write=False)
        return {"levels": self._node.log_policy.levels()}

    @json_route(app, "/admin/log-levels", ["PUT"])
    def put_log_levels(self, request):
        self._node.admin.authorize(request, write=True)
        check_write_headers(request)
        body = parse_json_body(request)
        policy = self._node.log_policy
        if not isinstance(body, dict) or not body or set(body) - {"level", "levels"}:
            raise bad_request("invalid_body", "Send {\"level\": \"debug\"} or {\"levels\": {\"http\": \"debug\"}}.")
        levels = body.get("levels", {})
        if not isinstance(levels, dict):
            raise bad_request("invalid_body", "\"levels\" must map areas to levels.")
        if "level" in body and not isinstance(body["level"], str):
            raise bad_request("invalid_level", "\"level\" must name a level.")
        try:
            new_levels = policy.updated(body.get("level"), levels)
        except UnknownLevel as error:
            # Nothing was changed.
            message = str(error)
            raise bad_request("invalid_level", message[:1].upper() + message[1:] + ".")
        LEVELS_CHANGED.log(levels=new_levels)
        # Set once this request's own action has ended: levels set now would drop its end line, and eliot-tree
        # would show the request that changed them as never finished. They are set before the answer leaves.
        request.after_accounting(lambda: policy.update(levels=new_levels))
        return {"levels": new_levels}

    @json_route(app, "/bulk", ["POST"])
    def bulk(self, request):
        """
        Many operations in one request: ``{"get": [keys], "put": [{"key", "value", "ttl"}],
        "delete": [keys]}``.
        """
        check_write_headers(request)
        body = parse_json_body(request)
        if not isinstance(body, dict) or set(body) - {"get", "put", "delete"}:
            raise bad_request("invalid_body", "A bulk body has \"get\", \"put\" and \"delete\" lists.")
        gets, puts, deletes = body.get("get", []), body.get("put", []), body.get("delete", [])
        if not all(isinstance(items, list) for items in (gets, puts, deletes)):
            raise bad_request("invalid_body", "\"get\", \"put\" and \"delete\" must be lists.")
        if len(gets) + len(puts) + len(deletes) > MAX_BULK_OPERATIONS:
            raise bad_request("too_many_operations", "A bulk request holds at most %d operations."
                              % (MAX_BULK_OPERATIONS,))
        limit = self._node.settings.max_key_length
        # Each key once: the answer maps keys to values, and a JSON object names each member once.
        get_keys = list(dict.fromkeys(_each(gets, "get", lambda key: validate_key(key, limit))))
        delete_keys = _each(deletes, "delete", lambda key: validate_key(key, limit))
        fits_store = self._node.coordinator.store.check_fits
        max_value = self._node.settings.max_value_size

        def check_fits(key: str, value: bytes, ttl: Optional[float] = None) -> None:
            # A value no larger than a single PUT could store (the bulk body's own limit is 8 times that), and
            # no deeper: each value is checked, rather than the whole body, whose many small objects would
            # send every bulk request through the full scan.
            if len(value) > max_value:
                raise too_large("A value is larger than MAX_VALUE_SIZE (%d bytes)." % (max_value,))
            _check_depth(value, MAX_VALUE_DEPTH)
            fits_store(key, value, ttl)

        writes = _each(puts, "put", lambda item: parse_bulk_put(item, limit, check_fits))
        return self._bulk(get_keys, writes, delete_keys)

    async def _bulk(self, get_keys, writes, delete_keys):
        """
        Reads, writes and deletes, each kind in one call per node (reads first, then writes, then
        deletes; a read does not see a write of the same request).
        """
        coordinator = self._node.coordinator
        metrics = self._node.metrics
        answer_limit = BULK_ANSWER_VALUES * self._node.settings.max_value_size
        # Refused whole only before anything is done: a clock found skewed between two groups (a heartbeat, the
        # evaluation each second) refuses the groups after it item by item, and the answer still tells what the
        # groups before it did (writes acknowledged, values read).
        coordinator.check_serving(writes=bool(writes or delete_keys))
        found = await _read_within(coordinator, get_keys, answer_limit) if get_keys else []
        written = await _refused_as_items(coordinator.put_many, writes) if writes else []
        deleted = await _refused_as_items(coordinator.delete_many, delete_keys) if delete_keys else []
        return b"".join([b'{"get":{', _get_answers(get_keys, found, metrics, answer_limit), b'},"put":[',
                         _put_answers(writes, written, metrics), b'],"delete":[',
                         _delete_answers(delete_keys, deleted, metrics), b"]}"])


async def _refused_as_items(call, items: list) -> list:
    """
    ``call(items)``'s results, or, where it refuses them all (this node's clock turned skewed, or the node
    began starting over), an :class:`Unavailable` for each.
    """
    try:
        return await call(items)
    except (ClockSkewed, Unavailable) as error:
        return [Unavailable(str(error))] * len(items)


# The answers of a bulk request are built as bytes, the bytes json_bytes would give for them: the JSON encoder
# is pure Python on PyPy, and a request holds up to MAX_BULK_OPERATIONS of them. Each outcome is counted once a
# request, not once an operation.

#: Stands, in a bulk get's results, for a key not read: the answer was full before its turn.
_NOT_READ = object()


async def _read_within(coordinator, keys, limit: int) -> list:
    """
    The entries of ``keys`` (as ``read_many`` gives them), read in slices until they pass ``limit`` bytes of
    values; the keys after that are not read (:data:`_NOT_READ`). Read all at once, 1000 keys of the largest
    values would be copied out of the stores (and the peers' answers) whole before the answer's limit could
    apply. The first slice holds as many keys as the limit holds of the largest values; each next one, as many
    as the room left holds at the mean size seen so far (for small values: the rest, in one read).
    """
    found: list = []
    size = 0
    values = 0
    step = BULK_ANSWER_VALUES
    while len(found) < len(keys) and size <= limit:
        try:
            entries = await coordinator.read_many(keys[len(found):len(found) + step])
        except (ClockSkewed, Unavailable) as error:
            # Refused after a first slice was read (the check before the first is the request's): the rest is
            # unavailable, what was read is answered.
            if not found:
                raise
            found.extend([Unavailable(str(error))] * (len(keys) - len(found)))
            return found
        for entry in entries:
            value = getattr(entry, "value", None)
            if value is not None:
                size += len(value)
                values += 1
        found.extend(entries)
        step = len(keys) if not values else max(1, int((limit - size) * values / max(size, 1)) + 1)
    found.extend([_NOT_READ] * (len(keys) - len(found)))
    return found


def _get_answers(keys, found, metrics, limit: int) -> bytes:
    """
    :param limit: bytes of entries the answer carries at most; the keys found beyond it are answered
        ``answer_too_large``, to be read on their own.
    """
    gets = []
    hits = misses = 0
    size = 0
    for key, entry in zip(keys, found):
        if entry is _NOT_READ:
            body = _ANSWER_TOO_LARGE
        elif isinstance(entry, Unavailable):
            body = b'{"error":"unavailable"}'
        elif entry is None:
            misses += 1
            body = b"null"
        else:
            # Stored values are spliced in as stored, never parsed again.
            body = entry_json(entry)
            size += len(body)
            if size > limit:
                body = _ANSWER_TOO_LARGE
            else:
                hits += 1
        gets.append(json_key(key) + b":" + body)
    _count(metrics, "get", "hit", hits)
    _count(metrics, "get", "miss", misses)
    return b",".join(gets)


def _put_answers(writes, written, metrics) -> bytes:
    puts = []
    created = replaced = 0
    # Node ids as JSON string contents: a batch's versions nearly all name this node.
    nodes: dict = {}
    for (key, _, _), result in zip(writes, written):
        if isinstance(result, Unavailable):
            puts.append(json_bytes({"key": key, "status": 503, "error": "unavailable", "message": str(result)}))
            continue
        if result.created:
            created += 1
            status = b',"status":201,"version":"'
        else:
            replaced += 1
            status = b',"status":200,"version":"'
        wall, counter, node = result.entry.version
        node_json = nodes.get(node)
        if node_json is None:
            node_json = nodes[node] = json_bytes(node)[1:-1]
        puts.append(b"".join([b'{"key":', json_key(key), status, b"%d.%d." % (wall, counter), node_json, b'"}']))
    _count(metrics, "put", "created", created)
    _count(metrics, "put", "replaced", replaced)
    return b",".join(puts)


def _delete_answers(keys, deleted, metrics) -> bytes:
    deletes = []
    existed = missed = 0
    for key, result in zip(keys, deleted):
        if isinstance(result, Unavailable):
            deletes.append(json_bytes({"key": key, "status": 503, "error": "unavailable", "message": str(result)}))
        elif result.created is False:
            existed += 1
            deletes.append(b'{"key":' + json_key(key) + b',"status":200}')
        else:
            missed += 1
            deletes.append(b'{"key":' + json_key(key) + b',"status":404}')
    _count(metrics, "delete", "deleted", existed)
    _count(metrics, "delete", "miss", missed)
    return b",".join(deletes)


def _count(metrics, op: str, result: str, count: int) -> None:
    # An outcome that did not occur adds no sample (counted an operation at a time, it never did).
    if count:
        metrics.cache(op, result, count)


handle_routing_errors(PublicAPI.app)

