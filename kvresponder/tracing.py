"""
OpenTelemetry tracing: one server span per HTTP request, one client span per peer call.

A server span continues the W3C ``traceparent`` of the request, so a write replicated to two nodes is one
trace: client → coordinator's server span → its peer-call spans → the replicas' server spans. Spans are
exported over OTLP/HTTP by a batch processor (export runs in its own thread and never blocks the reactor),
and only when ``JAEGER_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set. Without an endpoint, no tracer
exists and the request path skips tracing entirely.
"""

import logging
import threading
from contextlib import contextmanager
from typing import Dict, Optional

from eliot import write_failure
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

#: OpenTelemetry's ``http.request.method`` for a method HTTP does not define.
_OTHER_METHOD = "_OTHER"

#: Seconds a stopping node gives the tracer to export the spans it still holds. Left to itself, the SDK's
#: shutdown waits for the exporter, which waits up to its own timeout (5 s) for a collector that does not
#: answer: longer than the chart leaves a stopping pod after its drain and its wait for requests.
SHUTDOWN_TIMEOUT = 0.5
#: Seconds between two log lines about spans the exporter failed to send: it tries every second while a collector
#: is down.
FAILURE_LOG_EVERY = 60.0


#: How the SDK's batch processor says it began dropping spans, its queue full (the collector too slow or down): the
#: only sign of it outside its private state, and said at most once in 20 s (its logger drops repeats), not for each
#: span (so they are not counted).
#: ``tests/test_tracing.py`` fails if it changes.
QUEUE_FULL = "Queue full"
#: How the SDK's exporter begins its word that a try failed and it will try again, and what it says when it has
#: given up; ``tests/test_tracing.py`` fails if they change.
RETRYING = "Transient error"
GAVE_UP = "max retries or shutdown"
#: Characters of the SDK's word kept: with an earlier try's word added (a refused connection's, through urllib3,
#: runs to 400), a line's reason still names the cause.
MAX_REASON = 600


class _LastWords(logging.Handler):
    """
    Keeps the last message the OpenTelemetry SDK logged (why an export failed: a refused connection, a bad
    answer), for the node's own line about the failure; the SDK would otherwise write one to stderr each try. Its
    word that its queue is full, dropping spans, goes to its listeners instead (called in the thread that ended the
    span). The SDK's logger is the process's: every node's tracing in one process listens (its line does not say
    whose queue is full).
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.WARNING)
        self.last = ""
        #: The SDK's word that a try failed and it will try again (which says why), until its next word.
        self._retrying = ""
        self._listeners: list = []

    def listen(self, dropped) -> None:
        """
        Call ``dropped()`` each time the SDK says its queue is full, until :meth:`unlisten`.
        """
        self._listeners.append(dropped)

    def unlisten(self, dropped) -> None:
        if dropped in self._listeners:
            self._listeners.remove(dropped)

    def emit(self, record) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        if message.startswith(QUEUE_FULL):
            for dropped in list(self._listeners):
                dropped()
            return
        retrying, self._retrying = self._retrying, ""
        if message.startswith(RETRYING):
            self._retrying = message
        elif retrying and GAVE_UP in message:
            # The SDK's last word after its retries says only that it gave up: the reason (a refused connection, a
            # timeout) was in its word about an earlier try of the same export (it says nothing of the last).
            message = "%s Earlier try: %s" % (message, retrying)
        self.last = message[:MAX_REASON]

    def export_started(self) -> None:
        """
        Forget the word about a try that failed before: an export that then succeeded says nothing more, and its
        word must not be taken for the reason of a later export that fails at its first try.
        """
        self._retrying = ""


def _sdk_last_words() -> _LastWords:
    """
    The one handler that keeps the SDK's last message, installed on its logger (the first time) instead of stderr.
    """
    sdk_log = logging.getLogger("opentelemetry")
    for handler in sdk_log.handlers:
        if isinstance(handler, _LastWords):
            return handler
    handler = _LastWords()
    sdk_log.addHandler(handler)
    sdk_log.propagate = False
    return handler


class _ReportingExporter:
    """
    A span exporter whose failed exports are reported (``failed(count)``, called in the exporter's thread).
    """

    def __init__(self, exporter, failed, last_words: Optional[_LastWords] = None) -> None:
        self._exporter = exporter
        self._failed = failed
        self._last_words = last_words

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult
        if self._last_words is not None:
            self._last_words.export_started()
        try:
            result = self._exporter.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._failed(len(spans))
        return result

    def shutdown(self):
        return self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class Tracing:
    """
    :param provider: an OpenTelemetry ``TracerProvider``, or ``None`` when tracing is off.
    :param reactor: ``IReactorThreads`` and ``IReactorTime``, for :meth:`shutdown`; needed with a provider.
    """

    def __init__(self, provider=None, reactor=None, last_words: Optional[_LastWords] = None) -> None:
        if provider is not None and reactor is None:
            raise TypeError("Tracing with a provider needs the reactor its shutdown runs on")
        self.provider = provider
        self._reactor = reactor
        self._last_words = last_words
        self._tracer = None
        #: Spans the exporter failed to send (a collector down or refusing): counted, and logged at most once a
        #: minute, as is the SDK's word that its queue is full and it drops spans (a collector too slow).
        self.spans_failed = 0
        self._failed_logged_at = None
        self._failed_unlogged = 0
        self._log_pending = None
        self._why = ""
        if provider is not None:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
            self._tracer = provider.get_tracer("kvresponder")
            self._propagator = TraceContextTextMapPropagator()
            if last_words is not None:
                last_words.listen(self._queue_full)

    def _queue_full(self) -> None:
        # In the thread that ended the span.
        self._reactor.callFromThread(self.spans_lost, 0, QUEUE_FULL)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @classmethod
    def from_settings(cls, settings, version: str, reactor, exporter=None) -> "Tracing":
        """
        Tracing for a node: off without an OTLP endpoint (and no exporter given).
        """
        endpoint = settings.otlp_endpoint
        if not endpoint and exporter is None:
            return cls(None)
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({
            "service.name": "kv-responder",
            "service.version": version,
            "service.instance.id": settings.node_id,
            "kv.tenant": settings.tenant,
            "kv.node": settings.node_id,
        })
        provider = TracerProvider(resource=resource)
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=5)
        # The SDK's own lines (a line each try while the collector is down) are kept back: the node says what
        # failed, and why, in its own line (``traces-export-failed``), once a minute.
        last_words = _sdk_last_words()
        tracing = cls(provider, reactor, last_words)
        provider.add_span_processor(BatchSpanProcessor(
            _ReportingExporter(exporter, lambda count: reactor.callFromThread(tracing.spans_lost, count), last_words),
            schedule_delay_millis=1000))
        return tracing

    def spans_lost(self, count: int, why: Optional[str] = None) -> None:
        """
        ``count`` spans could not be exported (0: some were dropped from the full queue, how many the SDK does not
        say), for ``why`` (by default, the SDK's last word); called in the reactor's thread. Logged at once, or
        with those lost since, a minute after the last line.
        """
        self.spans_failed += count
        self._failed_unlogged += count
        self._why = why if why is not None else (self._last_words.last if self._last_words is not None else "")
        now = self._reactor.seconds()
        if self._failed_logged_at is None or now - self._failed_logged_at >= FAILURE_LOG_EVERY:
            self._log_lost()
        elif self._log_pending is None:
            self._log_pending = self._reactor.callLater(self._failed_logged_at + FAILURE_LOG_EVERY - now,
                                                        self._log_lost)

    def _log_lost(self) -> None:
        from .log.service import TRACES_EXPORT_FAILED
        if self._log_pending is not None and self._log_pending.active():
            self._log_pending.cancel()
        self._log_pending = None
        self._failed_logged_at = self._reactor.seconds()
        TRACES_EXPORT_FAILED.log(spans=self._failed_unlogged, reason=self._why)
        self._failed_unlogged = 0

    # -- server spans ---------------------------------------------------------------------------------

    def start_server_span(self, request, method: str):
        """
        Start the span of one request, continuing its ``traceparent``, and make it current.

        :param method: the request's method as the metrics name it: one HTTP defines, or ``other``. A span is
            named and tagged with it, never with whatever a client sent (OpenTelemetry's HTTP conventions: an
            unknown method is ``_OTHER`` and the span is named ``HTTP``), or each made-up method would add an
            operation to the collector's index.
        :return: a handle for :meth:`end_server_span`.
        """
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind

        carrier = {}
        for name in (b"traceparent", b"tracestate"):
            value = request.getHeader(name)
            if value:
                carrier[name.decode("ascii")] = value.decode("ascii", "replace")
        parent = self._propagator.extract(carrier) if carrier else None
        method = _OTHER_METHOD if method == "other" else method
        span = self._tracer.start_span(
            "HTTP" if method == _OTHER_METHOD else "HTTP %s" % (method,), context=parent, kind=SpanKind.SERVER,
            attributes={"http.request.method": method})
        token = context.attach(trace.set_span_in_context(span))
        return span, token

    def detach(self, handle) -> None:
        from opentelemetry import context
        context.detach(handle[1])

    def end_server_span(self, handle, route: str, status: int) -> None:
        from opentelemetry.trace import Status, StatusCode
        span = handle[0]
        method = span.attributes.get("http.request.method", _OTHER_METHOD)
        span.update_name("%s %s" % ("HTTP" if method == _OTHER_METHOD else method, route))
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    # -- client spans ---------------------------------------------------------------------------------

    @contextmanager
    def client_span(self, op: str, peer_id: str):
        """
        A span around one peer call; yields the headers that carry its context.
        """
        from opentelemetry.trace import SpanKind
        with self._tracer.start_as_current_span("peer %s" % (op,), kind=SpanKind.CLIENT,
                                                attributes={"kv.peer": peer_id, "kv.op": op}) as span:
            carrier: Dict[str, str] = {}
            self._propagator.inject(carrier)
            yield carrier, span

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> Deferred:
        """
        Export the spans still held and close the exporter, for at most ``timeout`` seconds.

        The SDK's shutdown blocks until the export in progress ends, so it runs in a thread of its own: not the
        reactor's thread pool, which the reactor joins as it stops. A daemon thread, so that an export still
        waiting on its collector when the process exits does not hold the exit up.

        :return: a Deferred firing with ``True`` once it is done, or with ``False`` if ``timeout`` passed
            first (the spans still held are then lost with the process). A failure of the SDK's shutdown is
            logged, and counts as done.
        """
        if self.provider is None:
            return succeed(True)
        if self._last_words is not None:
            self._last_words.unlisten(self._queue_full)
        if self._log_pending is not None and self._log_pending.active():
            self._log_pending.cancel()
        self._log_pending = None
        reactor = self._reactor
        done: Deferred = Deferred()

        def settle(outcome) -> None:
            if isinstance(outcome, Failure):
                write_failure(outcome)
            if not done.called:
                timer.cancel()
                done.callback(True)

        def run() -> None:
            try:
                self.provider.shutdown()
                outcome = None
            except Exception:
                outcome = Failure()
            reactor.callFromThread(settle, outcome)

        timer = reactor.callLater(timeout, lambda: done.called or done.callback(False))
        threading.Thread(target=run, name="kvresponder-tracing-shutdown", daemon=True).start()
        return done


def traces_url(endpoint: str) -> str:
    """
    The OTLP/HTTP traces URL for an endpoint given as a base (``http://jaeger:4318``) or in full.
    """
    endpoint = endpoint.rstrip("/")
    if endpoint.endswith("/v1/traces"):
        return endpoint
    return endpoint + "/v1/traces"


OFF = Tracing(None)

__all__ = ["Tracing", "OFF", "SHUTDOWN_TIMEOUT", "traces_url", "Optional"]
