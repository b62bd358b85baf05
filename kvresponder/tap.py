"""
``twistd kvresponder``: the options and the service tree.

This is the only module that touches the global reactor. Everything below receives it.
"""

import os
import signal
import sys
import time
from typing import Callable

from eliot import add_destinations
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import ensureDeferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall, deferLater
from twisted.python import usage
from twisted.python.log import ILogObserver, textFromEventDict

from . import __version__
from .listening import ListeningEndpoint, accept_waiting
from .log import DEBUG
from .log.service import TWISTED_LOG
from .privateapi import dispatch_without_log_context, time_reactor_by
from .settings import OPTIONS, SettingsError, load_settings


#: Seconds between flushes of the log stream.
LOG_FLUSH_INTERVAL = 0.2
#: Seconds a stopping node waits, at most, for its last log lines to be written: with the tracer's half second,
#: within the second to exit that the chart's drain timeout leaves at least.
LOG_DRAIN_TIMEOUT = 0.5


class Options(usage.Options):
    """
    Every option falls back to its environment variable, then to its default; the command line wins.
    """

    optParameters = [
        [option.name, None, None, "%s [env: %s; default: %s]" % (
            option.help, " or ".join(option.env), option.default if option.default is not None else "-")]
        for option in OPTIONS if not option.is_flag
    ]
    optFlags = [
        [option.name, None, "%s [env: %s]" % (option.help, " or ".join(option.env))]
        for option in OPTIONS if option.is_flag
    ]

    def parseOptions(self, options=None) -> None:
        """
        A command line twistd cannot parse (an unknown option, a value missing) stops with one line, as a bad
        setting does, rather than twistd's usage of every option with the error after it.
        """
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as error:
            sys.stderr.write("kvresponder: error: %s (twistd kvresponder --help lists the options)\n" % (error,))
            sys.stderr.flush()
            raise SystemExit(2)

    def given(self) -> dict:
        """
        The options given on the command line, as text; ``None`` for those not given.
        """
        values = {}
        for option in OPTIONS:
            value = self.get(option.name)
            if option.is_flag:
                value = "true" if value else None
            values[option.name] = value
        return values


class TwistedToEliot:
    """
    A legacy Twisted log observer that sends Twisted's own log lines through Eliot, so stdout stays pure
    JSON lines that ``eliot-tree`` can read. Twisted's chatter (a line for every factory started or stopped,
    one per peer connection) only passes at debug; its errors always do.
    """

    def __init__(self, policy=None) -> None:
        self.policy = policy

    def __call__(self, event: dict) -> None:
        error = bool(event.get("isError"))
        if not error and self.policy is not None and not self.policy.enabled("service", DEBUG):
            return
        text = textFromEventDict(event)
        if text is None:
            return
        TWISTED_LOG.log(message=text, error=error)


class KVResponderService(MultiService):
    """
    The node's services, stopped in order: drain first (HTTP and discovery still up, heartbeats saying
    "leaving"), then discovery's heartbeats, then HTTP (no new connection; the requests being handled are
    answered first), then discovery's last word ("gone": peers forget the node), then the copy streams and the
    peer connection pool. From the first step on, the node refuses the
    copies its peers send it, over HTTP and on the copy streams still open into it (503 ``leaving``: the sender
    fails them over), so that nothing it acknowledges is taken down when the process exits.
    """

    def __init__(self, node, http_service, discovery_service, pool=None, tracing=None, site=None,
                 listening=None) -> None:
        MultiService.__init__(self)
        #: The client port's :class:`~kvresponder.listening.ListeningEndpoint`, or ``None``.
        self.listening = listening
        self.tracing = tracing
        self.site = site
        self.node = node
        self.http_service = http_service
        self.discovery_service = discovery_service
        self.pool = pool
        http_service.setServiceParent(self)
        discovery_service.setServiceParent(self)

    def setServiceParent(self, parent):
        # twistd builds the Application around us; give it our log observer so Twisted's lines are JSON.
        MultiService.setServiceParent(self, parent)
        if hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, TwistedToEliot(self.node.log_policy))

    def privilegedStartService(self):
        # The client port is opened here (StreamServerEndpointService's privileged start); a port taken by another
        # process only gets a log line from Twisted. Raised, it makes twistd exit non-zero before the node starts:
        # a node its peers put in their rings without being able to reach it would take writes they think copied.
        try:
            MultiService.privilegedStartService(self)
        except CannotListenError as error:
            # The discovery port (UDP), held by another process without SO_REUSEADDR.
            os.write(2, ("kvresponder: error: --discovery-port: %s\n" % (error,)).encode())
            raise SystemExit(1)
        if self.listening is not None and self.listening.failure is not None:
            # To the process's own stderr: twistd has sent sys.stderr to the log by now, whose writer thread
            # would not get to write it before the exit.
            os.write(2, ("kvresponder: error: %s\n" % (self.listening.failure.getErrorMessage(),)).encode())
            raise SystemExit(1)

    def startService(self):
        MultiService.startService(self)
        self.node.start()

    def stopService(self):
        return ensureDeferred(self._stop())

    async def _stop(self):
        from .http.site import REQUESTS_DONE_POLL
        from .log.service import REQUESTS_ANSWERED, SERVICE_STOPPING, TRACES_UNEXPORTED
        from .tracing import SHUTDOWN_TIMEOUT
        SERVICE_STOPPING.log()
        _ignore_further_stop_signals()
        clock = self.node.clock
        # A Service's endpoints, and the proxies and clients that follow them, take a moment to stop sending this
        # node requests, and a drain that has nothing to hand off ends at once: the listener stays open that long.
        settings = self.node.settings
        serve_until = clock.seconds() + min(settings.serve_after_leaving, settings.drain_timeout)
        self.node.begin_leaving()
        if self.site is not None:
            self.site.begin_leaving()
        self.discovery_service.protocol.announce()
        await self.node.drain()
        # Requests from clients that chose this node just before it began leaving are still answered (kv reads and
        # writes, which it coordinates to the other nodes).
        await deferLater(clock, max(0.0, serve_until - clock.seconds()), lambda: None)
        self.running = 0
        self.discovery_service.stop_heartbeats()
        try:
            # The connections waiting to be accepted are taken in, not reset as the port closes.
            accepted = self.listening is not None and accept_waiting(self.listening.port)
            await maybeDeferred(self.http_service.stopService)
            if accepted:
                # What they sent is read in the next turns: then they count as owing answers, waited for below.
                await deferLater(clock, REQUESTS_DONE_POLL, lambda: None)
            if self.site is not None:
                # No new connections now; the requests already taken are answered before the process exits (a
                # read may wait for a peer's timeout, and a retry after it).
                started = self.site.seconds()
                unanswered = await self.site.requests_done(2 * self.node.settings.peer_request_timeout)
                REQUESTS_ANSWERED.log(waited=round(self.site.seconds() - started, 3), unanswered=unanswered)
        finally:
            # The node stops serving only now: the requests on the connections taken from the backlog above, and
            # those still being answered, are served (coordinated to the other nodes), not refused as "stopping".
            self.node.stop()
            # Whatever failed above: peers forget this node now, and stop asking it for what a leaving node may
            # still hold, before its streams close and its address goes with its pod (a call to an address that
            # is gone waits its whole timeout).
            await maybeDeferred(self.discovery_service.depart)
            self.node.peers.close_streams()
            if self.pool is not None:
                await self.pool.closeCachedConnections()
            if self.tracing is not None and self.tracing.enabled:
                if not await self.tracing.shutdown():
                    TRACES_UNEXPORTED.log(timeout=SHUTDOWN_TIMEOUT)


def _ignore_further_stop_signals() -> None:
    """
    Take SIGTERM and SIGINT from Twisted's handlers for the rest of the process's life, once it is stopping: each
    asked the reactor to stop again, which logged a ``ReactorNotRunning`` traceback at error level, and a SIGINT
    made the process end by SIGINT rather than by the SIGTERM it stopped for. Only in the main thread, where
    Python lets handlers be set (a test's reactor may run elsewhere).
    """
    import threading
    if threading.current_thread() is not threading.main_thread():
        return
    from twisted.internet import reactor

    from .log.service import STOP_SIGNAL_IGNORED

    def ignored(signum, frame):
        # Logged from the reactor's turn, not from inside whatever the handler interrupted (a line being written).
        reactor.callFromThread(STOP_SIGNAL_IGNORED.log, signal=signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, ignored)


def steady_seconds(wall: Callable[[], float] = time.time,
                   monotonic: Callable[[], float] = time.monotonic) -> Callable[[], float]:
    """
    The reactor's clock: the wall clock's reading when the node starts, advancing with the monotonic clock from
    then on. Twisted times every ``callLater`` and ``LoopingCall`` on ``reactor.seconds``, the wall clock by
    default: stepped back N seconds (NTP setting right a clock that ran ahead), every timer armed before the step
    (heartbeats, peer expiry, the sweep, anti-entropy) would wait N seconds more, and the node would fall out of
    every peer's ring for that long (a year, for a clock set a year ahead); stepped forward, every peer would be
    expired at once. Nothing reads this clock as the time of day: versions, TTLs, signatures, heartbeats' times
    and the Date header take ``time.time`` (``wall``) explicitly.

    It never goes back. A monotonic clock does not, but one faked with the wall clock (libfaketime, as the chaos
    suite steps a node's clock) did: a ``callLater(0)`` armed just before the step, the end of the reactor turn
    that sends its answers, then waited as long as the step, and every answer with it. A step back is absorbed:
    the clock goes on from where it was.
    """
    state = [wall() - monotonic(), float("-inf")]  # the offset, and the last reading

    def seconds() -> float:
        now = monotonic() + state[0]
        if now < state[1]:
            state[0] += state[1] - now
            now = state[1]
        state[1] = now
        return now
    return seconds


def _refuse(message: str) -> None:
    """
    Stop the start with one line and exit 2, as a bad setting does.
    """
    sys.stderr.write("kvresponder: error: %s\n" % (message,))
    sys.stderr.flush()
    raise SystemExit(2)


def makeService(config: Options, reactor=None, environ=None, stdout=None):
    """
    Build the whole service tree from options and the environment. A bad setting prints one line naming
    the option and exits non-zero, before anything listens.
    """
    if reactor is None:
        from twisted.internet import reactor
        time_reactor_by(reactor, steady_seconds())
        dispatch_without_log_context(reactor)
    environ = os.environ if environ is None else environ
    try:
        settings = load_settings(config.given(), environ)
    except SettingsError as error:
        sys.stderr.write("kvresponder: error: %s\n" % (error,))
        sys.stderr.flush()
        raise SystemExit(2)
    if settings.multicast_enabled and settings.clustering != "disabled":
        from .discovery import interface_problem
        problem = interface_problem(settings.discovery_interface)
        if problem is not None:
            # Refused rather than left to the kernel: heartbeats would leave by the default route, or not at all.
            sys.stderr.write("kvresponder: error: --discovery-interface (DISCOVERY_INTERFACE, by default the advertise "
                             "address) for multicast: %s\n" % (problem,))
            sys.stderr.flush()
            raise SystemExit(2)

    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from .clockskew import ROUND_TRIP_SHARE
    from .discovery import DiscoveryProtocol, DiscoveryService, HeartbeatCodec, derive_key, resolve_all
    from .http.root import build_root
    from .http.site import KVSite
    from .log import JSONLineDestination, LogPolicy, dropped_lines_notice, open_log_sink, use_fast_task_ids
    from .log.service import SERVICE_STARTED
    from .log.writer import BackgroundWriter
    from .node import Node
    from .peers import CachedEndpoints
    from .reclaim import reclaimer
    from .stalls import StallWatch
    from .tracing import Tracing
    from .turn import EndOfTurn

    policy = LogPolicy(settings.log_level)
    try:
        sink = open_log_sink(settings.log_file, stdout)
    except OSError as error:
        _refuse("--log-file (LOG_FILE): cannot open %r for writing: %s" % (settings.log_file, error.strerror or error))
    try:
        endpoint = serverFromString(reactor, settings.listen_endpoint)
    except (ValueError, KeyError, TypeError, OSError) as error:
        # OSError: an ssl: endpoint whose certificate file is missing.
        _refuse("--port (PORT): %r is no endpoint this node can listen on: %s" % (settings.listen_endpoint, error))
    # The lines are written from a thread of their own: a log reader that falls behind costs lines, not requests.
    writer = BackgroundWriter(sink, dropped_lines_notice(settings.tenant, settings.node_id), settings.log_buffer)
    destination = JSONLineDestination(writer, policy, settings.tenant, settings.node_id, flush=False)
    use_fast_task_ids()
    add_destinations(destination)
    # Logs reach stdout within LOG_FLUSH_INTERVAL, and at once on stop and on errors.
    flusher = LoopingCall(destination.flush)
    flusher.clock = reactor
    flusher.start(LOG_FLUSH_INTERVAL, now=False)
    reactor.addSystemEventTrigger("after", "shutdown", destination.flush)
    reactor.addSystemEventTrigger("after", "shutdown", writer.drain, LOG_DRAIN_TIMEOUT)

    tracing = Tracing.from_settings(settings, __version__, reactor=reactor)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 16
    pool.cachedConnectionTimeout = 60
    pool.retryAutomatically = False
    endpoints = CachedEndpoints(reactor, settings.peer_request_timeout)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    # One end of the reactor turn for the node's answers and its copies' batches: one timer a turn for both.
    end_of_turn = EndOfTurn(reactor)
    node = Node(settings, reactor, HTTPClient(agent), wall=time.time, log_policy=policy, tracing=tracing,
                collect=reclaimer(reactor), stream_endpoint=endpoints.endpoint,
                monotonic=time.monotonic, end_of_turn=end_of_turn)
    node.metrics.register_counter("kv_log_lines_dropped", lambda: writer.dropped)
    node.metrics.register_counter("kv_trace_spans_failed", lambda: tracing.spans_failed)

    site = KVSite(build_root(node, node.authenticator), reactor, tracing=tracing,
                  metrics=node.metrics, log_policy=policy, body_limit=settings.max_value_size,
                  max_connections=settings.max_connections, timeout=settings.request_timeout,
                  max_header_bytes=settings.max_header_bytes, end_of_turn=end_of_turn,
                  wall=time.time, body_buffer=settings.max_body_buffer)
    listening = ListeningEndpoint(endpoint)
    http_service = StreamServerEndpointService(listening, site)

    key = derive_key(settings.cluster_secret, "discovery") if settings.cluster_secret else None
    protocol = DiscoveryProtocol(
        HeartbeatCodec(settings.tenant, key), node.membership, reactor, time.time, node.heartbeat,
        settings.discovery_group if settings.multicast_enabled else None, settings.discovery_interface,
        settings.discovery_port, settings.discovery_ttl, node.metrics, clock_offsets=node.clock_offsets,
        max_clock_offset=settings.max_clock_offset, alone=settings.clustering == "disabled",
        # A heartbeat held longer than a round trip may take is no sample of its sender's clock either.
        stalls=StallWatch(reactor, ROUND_TRIP_SHARE * settings.max_clock_offset),
        unicast_peers=settings.dns_enabled)
    # A node that has handed off under its ring says so at once: its peers' writes stop asking the previous owners.
    node.subscribe_settled(protocol.announce)
    discovery = DiscoveryService(
        protocol,
        lambda proto: reactor.listenMulticast(settings.discovery_port, proto, listenMultiple=True),
        settings.heartbeat_interval,
        dns_name=settings.discovery_dns if settings.dns_enabled else None,
        resolve=lambda name: resolve_all(reactor, name),
        dns_interval=max(settings.heartbeat_interval, 5.0),
        mode=settings.discovery_mode)

    SERVICE_STARTED.log(version=__version__, config=settings.redacted())
    return KVResponderService(node, http_service, discovery, pool, tracing, site, listening)
