"""
Deferred helpers shared by the modules that run several peer calls at once.
"""

from eliot import current_action, write_traceback
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.python.failure import Failure


def gather(coroutines) -> Deferred:
    """
    Run coroutines in parallel: a Deferred of their results in order. Each one handles its own expected
    failures; an unexpected one is logged and counts as ``None``.

    Counted here rather than with ``DeferredList``, whose completion evaluates a generic type at run time
    (``cast(_DeferredListResultListT[Any], ...)``): on PyPy that was a visible share of a read through a node
    that does not own the key, which gathers its owners' answers.
    """
    deferreds = [ensureDeferred(coroutine) for coroutine in coroutines]
    if not deferreds:
        return succeed([])
    values: list = [None] * len(deferreds)
    left = [len(deferreds)]
    # Cancelled, it cancels what it gathers (as DeferredList did): they settle as None, and it fires with them.
    done: Deferred = Deferred(lambda _: [deferred.cancel() for deferred in deferreds])
    # An unexpected failure is logged in the caller's action, not in whatever fired the Deferred that failed.
    action = current_action()

    def settle(value, index: int) -> None:
        if isinstance(value, Failure):
            if action is None:
                write_traceback(exc_info=(value.type, value.value, value.tb))
            else:
                with action.context():
                    write_traceback(exc_info=(value.type, value.value, value.tb))
            value = None
        values[index] = value
        left[0] -= 1
        if not left[0]:
            done.callback(values)

    for index, deferred in enumerate(deferreds):
        deferred.addBoth(settle, index)
    return done
