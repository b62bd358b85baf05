"""
Eliot types of the service area: start, stop and configuration.
"""

from eliot import Field, MessageType

from . import INFO, WARNING, leveled

SERVICE_STARTED = leveled("service", INFO, MessageType(
    "kvresponder:service:started",
    [Field.for_types("version", [str], "Package version."),
     Field.for_types("config", [dict], "Effective configuration, secrets redacted.")],
    "The node started."))

SERVICE_STOPPING = leveled("service", INFO, MessageType(
    "kvresponder:service:stopping", [], "The node is stopping."))

STOP_SIGNAL_IGNORED = leveled("service", INFO, MessageType(
    "kvresponder:service:stop-signal-ignored",
    [Field.for_types("signal", [str], "The signal's name (SIGTERM, SIGINT).")],
    "A stop signal came while the node was already stopping: its stop goes on as it was."))

REQUESTS_ANSWERED = leveled("service", INFO, MessageType(
    "kvresponder:service:requests-answered",
    [Field.for_types("waited", [float], "Seconds the stopping node waited, after its listener closed, for the "
                                        "requests it had taken."),
     Field.for_types("unanswered", [int], "Connections still owing an answer when the wait ended: more than 0 "
                                          "only if it ran out (twice PEER_REQUEST_TIMEOUT).")],
    "A stopping node is done waiting for the requests it took, and exits."))

TRACES_UNEXPORTED = leveled("service", WARNING, MessageType(
    "kvresponder:service:traces-unexported",
    [Field.for_types("timeout", [float], "Seconds the stopping node gave the tracer.")],
    "The tracer had not exported its last spans when the stopping node's time for it ran out (its collector "
    "did not answer in time): those spans are lost."))

TRACES_EXPORT_FAILED = leveled("service", WARNING, MessageType(
    "kvresponder:service:traces-export-failed",
    [Field.for_types("spans", [int], "Spans the exporter failed to send since the last such line (not sent again)."),
     Field.for_types("reason", [str], "The exporter's last word on why, or \"Queue full\": the collector was too "
                                      "slow for the spans made, and the SDK dropped some (it does not say how many).")],
    "The trace exporter could not send spans to the collector (JAEGER_ENDPOINT), or began dropping them from its "
    "full queue: logged at most once a minute; kv_trace_spans_failed_total counts those it failed to send."))

INSECURE = leveled("service", WARNING, MessageType(
    "kvresponder:service:insecure", [Field.for_types("reason", [str], "What is unprotected.")],
    "A protection is off."))

CLUSTER_DISABLED = leveled("service", WARNING, MessageType(
    "kvresponder:service:cluster-disabled", [Field.for_types("reason", [str], "Why, and how to cluster.")],
    "The node serves alone: it has no CLUSTER_SECRET and was not started with --insecure-cluster."))

# Written whatever the levels: it is logged before the new levels take effect (so that the request's own action
# ends under the old ones), and the only record of the change would otherwise be lost to the levels it replaces (a
# node at error set to debug, or set back).
LEVELS_CHANGED = leveled("service", WARNING, MessageType(
    "kvresponder:service:log-levels", [Field.for_types("levels", [dict], "The new levels.")],
    "Log levels were changed at run time."), always=True)

LOG_LINES_DROPPED = leveled("service", WARNING, MessageType(
    "kvresponder:service:log-lines-dropped",
    [Field.for_types("lines", [int], "Lines dropped since the last such message.")],
    "The node's log stream (stdout's pipe, or LOG_FILE's disk) fell behind, or failed, and the node dropped log "
    "lines rather than wait for it: written, whatever the levels, once the stream takes lines again."))

#: Not :func:`leveled`: its level is the line's own, debug, or error for Twisted's errors, and
#: :class:`~kvresponder.tap.TwistedToEliot` lets through only what the ``service`` area's level passes.
TWISTED_LOG = MessageType(
    "twisted:log",
    [Field.for_types("message", [str], "The line's text, as Twisted formatted it."),
     Field.for_types("error", [bool], "Whether Twisted logged it as an error.")],
    "A line Twisted itself logged, passed through.")
