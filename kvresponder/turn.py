"""
The end of a reactor turn: work that is cheaper done once for a whole turn than once for each event in it.
"""

from typing import Callable, List

from eliot import write_traceback


class EndOfTurn:
    """
    Runs each callable handed to it once, at the end of the reactor turn it was handed over in: after every
    event of that turn is handled, before the reactor waits for more. A node keeps one, for everything that
    waits for the end of the turn: one timer a turn, however many writers.

    - An HTTP server holds its answers until then (see ``kvresponder.http.site``). A reactor turn handles the
      requests of many connections, and a ``send`` that wakes a client sleeping on its socket costs far more
      than one to a client already awake: the first answer of a turn wakes the client, and the others find it
      awake, where answers sent one by one, as each request is handled, each woke it again.
    - A :class:`~kvresponder.batcher.Batcher` sends then the calls queued for a peer during the turn, as one
      batch.

    :param reactor: an ``IReactorTime``; the turn's end is its ``callLater(0)``.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._due: List[Callable[[], None]] = []

    def add(self, call: Callable[[], None]) -> None:
        """
        Call ``call()`` at the end of this reactor turn.
        """
        if not self._due:
            self._reactor.callLater(0, self._run)
        self._due.append(call)

    def _run(self) -> None:
        due, self._due = self._due, []
        for index, call in enumerate(due):
            try:
                call()
            except Exception:
                # One writer's failure must not keep the others' answers.
                write_traceback()
            except BaseException:
                # Not even then: the calls after it run at the end of the next turn.
                for later in due[index + 1:]:
                    self.add(later)
                raise
