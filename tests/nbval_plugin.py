"""pytest plugin for the strict nbval run of scripts/test.sh (``-p tests.nbval_plugin``): run cells as the build does.

- nbval 0.11 sends each cell to the kernel with ``store_history=False``. IPython decides whether a trailing ``;``
  silences a cell's value by reading the cell back from its input history, so without history a figure cell
  ending in ``;`` also returns its last value (``Text(...)``, ``<Axes: ...>``, a legend at a memory address):
  an output the build (nbclient, ``store_history=True``) never produced, and the comparison fails
  (nbval issue #194, IPython issue #14162). Cells run here with ``store_history=True``, as nbclient runs them;
  nothing else changes (nbval does not compare execution counts).
- nbval waits for a cell's reply for the whole cell timeout even when the kernel has died (killed for memory,
  crashed): here the wait checks every few seconds that the kernel is alive, and a dead one fails the cell at
  once (and nbval fails the notebook's remaining cells: "Kernel dead on test start").
"""

from __future__ import annotations

import time
from queue import Empty

from nbval.kernel import RunningKernel

ALIVE_CHECK_S = 5.0


def _execute_cell_input(self, cell_input, allow_stdin=None):
    return self.kc.execute(cell_input, store_history=True, allow_stdin=allow_stdin, stop_on_error=False)


def _await_reply(self, msg_id, timeout=None):
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = ALIVE_CHECK_S if deadline is None else max(0.0, min(ALIVE_CHECK_S, deadline - time.monotonic()))
        try:
            msg = self.get_message(stream="shell", timeout=wait)
        except Empty:
            if not self.is_alive():
                raise RuntimeError("the kernel died while running this cell (killed for memory? crashed?)") from None
            if deadline is not None and time.monotonic() >= deadline:
                raise
            continue
        if msg["parent_header"].get("msg_id") == msg_id:
            if msg["content"]["status"] == "aborted":
                raise RuntimeError("Kernel aborted execution request")
            return


def pytest_configure(config):
    RunningKernel.execute_cell_input = _execute_cell_input
    RunningKernel.await_reply = _await_reply
