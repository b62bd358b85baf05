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

INSECURE = leveled("service", WARNING, MessageType(
    "kvresponder:service:insecure", [Field.for_types("reason", [str], "What is unprotected.")],
    "A protection is off."))

CLUSTER_DISABLED = leveled("service", WARNING, MessageType(
    "kvresponder:service:cluster-disabled", [Field.for_types("reason", [str], "Why, and how to cluster.")],
    "The node serves alone: it has no CLUSTER_SECRET and was not started with --insecure-cluster."))

LEVELS_CHANGED = leveled("service", WARNING, MessageType(
    "kvresponder:service:log-levels", [Field.for_types("levels", [dict], "The new levels.")],
    "Log levels were changed at run time."))
