"""
The tracer's shutdown at a node's stop: bounded in time, off the reactor's thread. (Spans themselves are tested end
to end, against a real collector, in test_tracing_e2e.py.)
"""

import queue
import threading
import unittest

import pytest
from eliot.testing import capture_logging
from twisted.internet.task import Clock

from kvresponder.tracing import SHUTDOWN_TIMEOUT, Tracing


class _Reactor(Clock):
    """
    A clock whose ``callFromThread`` queues the call for the test to run, on the test's thread, as the reactor
    would run it on its own.
    """

    def __init__(self) -> None:
        Clock.__init__(self)
        self.from_threads: "queue.Queue" = queue.Queue()

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.from_threads.put((f, args, kwargs))

    def run_from_thread(self) -> None:
        f, args, kwargs = self.from_threads.get(timeout=10)
        f(*args, **kwargs)


class _Provider:
    """
    A ``TracerProvider`` whose shutdown waits for ``release`` and then does ``then``.
    """

    def __init__(self, then=None) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self._then = then
        self.shutdowns = 0

    def get_tracer(self, name):
        return object()

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.thread = threading.current_thread()
        self.entered.set()
        self.release.wait(10)
        if self._then is not None:
            self._then()


def _results(d) -> list:
    results = []
    d.addBoth(results.append)
    return results


def test_a_tracer_that_finishes_in_time_reports_done_and_cancels_its_timer():
    """If the tracer exports what it holds in time, then the stop goes on at once, with no timer left."""
    reactor = _Reactor()
    provider = _Provider()
    provider.release.set()
    results = _results(Tracing(provider, reactor).shutdown())
    reactor.run_from_thread()
    assert results == [True]
    assert provider.shutdowns == 1
    assert reactor.getDelayedCalls() == []


def test_a_tracer_still_exporting_at_the_timeout_is_left_behind_in_a_daemon_thread():
    """
    If the tracer is still exporting when its time is up, then the stop goes on without it, and its thread, a
    daemon, does not hold up the process's exit.
    """
    reactor = _Reactor()
    provider = _Provider()
    results = _results(Tracing(provider, reactor).shutdown())
    assert provider.entered.wait(10)
    thread = provider.thread
    assert thread.name == "kvresponder-tracing-shutdown" and thread is not threading.main_thread()
    # A daemon: an export still waiting on its collector does not hold the process's exit up.
    assert thread.daemon
    reactor.advance(SHUTDOWN_TIMEOUT - 0.01)
    assert results == []
    reactor.advance(0.01)
    assert results == [False]
    # Done after all, too late: nothing more happens.
    provider.release.set()
    reactor.run_from_thread()
    thread.join(10)
    assert results == [False]


class ShutdownFailureTests(unittest.TestCase):
    @capture_logging(None, encoder_=None)
    def test_a_tracer_whose_shutdown_fails_is_logged_and_counts_as_done(self, logger):
        """If the tracer's shutdown raises, then its traceback is logged and the stop goes on."""
        def fail():
            raise RuntimeError("exporter exploded")

        reactor = _Reactor()
        provider = _Provider(then=fail)
        provider.release.set()
        results = _results(Tracing(provider, reactor).shutdown())
        reactor.run_from_thread()
        assert results == [True]
        [traceback] = logger.tracebackMessages
        assert str(traceback["reason"]) == "exporter exploded"
        logger.flushTracebacks(RuntimeError)


def test_with_tracing_off_there_is_nothing_to_shut_down():
    """If tracing is off, then the stop does not wait for it."""
    results = _results(Tracing(None, _Reactor()).shutdown())
    assert results == [True]


@pytest.mark.parametrize("timeout", [0.1, 2.0])
def test_the_timeout_given_is_the_one_waited(timeout):
    """If a timeout is given, then the stop waits that long for the tracer, not the default."""
    reactor = _Reactor()
    provider = _Provider()
    results = _results(Tracing(provider, reactor).shutdown(timeout))
    reactor.advance(timeout - 0.01)
    assert results == []
    reactor.advance(0.01)
    assert results == [False]
    provider.release.set()


def test_if_clients_send_methods_http_does_not_define_then_server_spans_keep_a_bounded_set_of_names():
    """
    If clients send methods HTTP does not define (``FOO1``, ``FOO2``, ...), then their server spans are named and
    tagged ``HTTP`` and ``_OTHER`` (OpenTelemetry's HTTP conventions), as the metrics count them as ``other``: a
    span name made of whatever a client sends would add an operation to the collector's index for each.
    """
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from kvresponder.http.root import build_root
    from kvresponder.http.site import KVSite

    from .support import stub_over
    from .test_api import API

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    api = API()
    api.site = KVSite(build_root(api.node), api.clock, metrics=api.node.metrics,
                      tracing=Tracing(provider, api.clock))
    api.stub = stub_over(api.site)
    for index in range(5):
        assert api.call("FOO%d" % (index,), "/kv/k")[0] == 405
    assert api.call("GET", "/kv/k")[0] == 404
    spans = exporter.get_finished_spans()
    assert sorted({span.name for span in spans}) == ["GET /kv/{key}", "HTTP /kv/{key}"]
    assert sorted({span.attributes["http.request.method"] for span in spans}) == ["GET", "_OTHER"]


def test_if_tracing_is_given_a_provider_without_a_reactor_then_it_refuses_rather_than_use_the_global_one():
    """
    If tracing is built with a provider but no reactor, then it raises at once: its shutdown would otherwise
    time itself on the global reactor, which nothing below the tap may use.
    """
    from opentelemetry.sdk.trace import TracerProvider

    with pytest.raises(TypeError):
        Tracing(TracerProvider())


def test_a_node_with_tracing_off_spares_its_replicated_writes_a_copy_of_the_context():
    """
    If a node is given a ``Tracing`` that is off (no provider: what the tap builds when no endpoint is set), then
    a replicated write outside any Eliot action takes no copy of the context for its failovers (there is no span
    to carry); with tracing on, it takes one.
    """
    from opentelemetry.sdk.trace import TracerProvider

    from kvresponder.node import Node

    from .support import make_settings

    clock = Clock()
    off = Node(make_settings(), clock, http=None, tracing=Tracing(None, clock))
    on = Node(make_settings(), clock, http=None, tracing=Tracing(TracerProvider(), clock))
    assert off.coordinator._write_context() is None
    assert on.coordinator._write_context() is not None


class _StuckExporter:
    """
    A span exporter whose exports wait for ``release`` and then fail, as against a collector that hangs and then
    refuses.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.FAILURE

    def shutdown(self):
        self.release.set()

    def force_flush(self, timeout_millis=30000):
        return True


class LostSpansTests(unittest.TestCase):
    @capture_logging(None)
    def test_a_full_queue_is_told_to_every_nodes_tracing_in_the_process_until_it_shuts_down(self, logger):
        """
        If two nodes' tracing run in one process (an in-memory cluster), then the SDK's word that a queue is full
        reaches each of them, not only the one made last (the word does not say whose queue); one that shut down
        hears it no more.
        """
        from .support import make_settings

        import logging

        from kvresponder.tracing import QUEUE_FULL

        first, second, third = _Reactor(), _Reactor(), _Reactor()
        tracing = Tracing.from_settings(make_settings(), "test", first, exporter=_StuckExporter())
        other = Tracing.from_settings(make_settings(node_id="n2"), "test", second, exporter=_StuckExporter())
        gone = Tracing.from_settings(make_settings(node_id="n3"), "test", third, exporter=_StuckExporter())
        gone.shutdown()
        # As the SDK says it (its own logger drops a repeat within 20 s, so the test says it on a logger of its own
        # under the SDK's, which the node's handler hears as it hears the SDK's).
        logging.getLogger("opentelemetry.test").warning(QUEUE_FULL + ", dropping span.")

        def told(reactor, tracing):
            return [call for call in list(reactor.from_threads.queue) if call[0] == tracing.spans_lost]
        self.assertEqual([call[1] for call in told(first, tracing)], [(0, QUEUE_FULL)])
        self.assertEqual([call[1] for call in told(second, other)], [(0, QUEUE_FULL)])
        self.assertEqual(told(third, gone), [])
        for each in (tracing, other):
            each.provider.shutdown()

    @capture_logging(None)
    def test_a_full_queue_and_the_spans_the_exporter_failed_are_logged_and_the_failed_ones_counted(self, logger):
        """
        If the collector hangs, so that the batch processor's queue fills and drops spans, and then refuses the
        spans it was sent, then one line says at once that the queue is full (the SDK's own warning is not
        written to stderr), ``spans_failed`` counts the spans the exporter failed to send, and those, lost within
        the minute after that line, are logged a minute after it, not left unsaid until some later failure.
        """
        from .support import make_settings
        from kvresponder.log.service import TRACES_EXPORT_FAILED
        from kvresponder.tracing import FAILURE_LOG_EVERY, QUEUE_FULL

        def lines():
            return [m for m in logger.messages if m.get("message_type") == TRACES_EXPORT_FAILED.message_type]

        reactor = _Reactor()
        exporter = _StuckExporter()
        tracing = Tracing.from_settings(make_settings(), "test", reactor, exporter=exporter)
        tracer = tracing.provider.get_tracer("test")
        made = 3000
        for _ in range(made):
            tracer.start_span("s").end()
        reactor.run_from_thread()  # the SDK's word that its queue is full
        self.assertEqual(tracing.spans_failed, 0)
        self.assertEqual([(line["spans"], line["reason"][:len(QUEUE_FULL)]) for line in lines()], [(0, QUEUE_FULL)])
        exporter.release.set()
        tracing.provider.force_flush()
        while tracing.spans_failed < exporter.exported or not reactor.from_threads.empty():
            reactor.run_from_thread()  # each export's failure, as the exporter's thread reports it
        self.assertTrue(0 < exporter.exported < made)
        self.assertEqual(tracing.spans_failed, exporter.exported)
        self.assertEqual(len(lines()), 1)
        reactor.advance(FAILURE_LOG_EVERY)
        self.assertEqual([line["spans"] for line in lines()], [0, exporter.exported])
        tracing.provider.shutdown()


def test_the_reason_kept_for_a_failed_export_names_the_error_of_the_last_try_not_only_that_the_sdk_gave_up():
    """
    If the collector refuses connections, then the SDK's exporter tries again, saying why ("Transient error ...
    Connection refused"), and then gives up saying only "due to timeout, max retries or shutdown": the reason kept
    for the node's ``traces-export-failed`` line holds both, so that it says what went wrong.
    """
    import logging
    import socket

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider

    from kvresponder.tracing import GAVE_UP, RETRYING, _sdk_last_words

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: every connection is refused
        words = _sdk_last_words()
        words.last = ""
        provider = TracerProvider()
        with provider.get_tracer("test").start_as_current_span("x") as span:
            pass
        exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:%d/v1/traces" % (port,), timeout=2)
        try:
            exporter.export([span])
        finally:
            exporter.shutdown()
            provider.shutdown()
    assert GAVE_UP in words.last and RETRYING in words.last, words.last
    assert "refused" in words.last.lower(), words.last
    assert logging.getLogger("opentelemetry").handlers.count(words) == 1


def test_the_word_about_a_failed_try_is_not_kept_past_the_export_it_belongs_to():
    """
    If an export's try failed and a retry then succeeded (the SDK says nothing more), and a later export gives
    up at its first try, then the reason kept for that one does not carry the earlier export's error.
    """
    import logging

    from kvresponder.tracing import GAVE_UP, RETRYING, _ReportingExporter, _sdk_last_words

    words = _sdk_last_words()
    sdk = logging.getLogger("opentelemetry.test")

    class Exporter:
        def __init__(self, said):
            self.said = said

        def export(self, spans):
            from opentelemetry.sdk.trace.export import SpanExportResult
            for line in self.said.pop(0):
                sdk.warning(line)
            return SpanExportResult.SUCCESS

    reporting = _ReportingExporter(Exporter([[RETRYING + " old: connection refused, retrying."],
                                             ["Failed to export span batch due to timeout, " + GAVE_UP + "."]]),
                                   lambda count: None, words)
    reporting.export([])
    reporting.export([])
    assert GAVE_UP in words.last and "old" not in words.last, words.last
