"""pytest plugin for the strict nbval run of scripts/test.sh (``-p tests.nbval_plugin``): run cells as Jupyter does.

nbval 0.11 sends each cell to the kernel with ``store_history=False``. IPython decides whether a trailing ``;``
silences a cell's value by reading the cell back from its input history, so without history a figure cell
ending in ``;`` also returns its last value (``Text(...)``, ``<Axes: ...>``, a legend at a memory address):
an output the build (nbclient, ``store_history=True``) never produced, and the comparison fails
(nbval issue #194, IPython issue #14162). Executing with ``store_history=True``, as nbclient does, restores the
build's behaviour; nothing else changes (nbval does not compare execution counts).
"""

from __future__ import annotations

from nbval.kernel import RunningKernel


def _execute_cell_input(self, cell_input, allow_stdin=None):
    return self.kc.execute(cell_input, store_history=True, allow_stdin=allow_stdin, stop_on_error=False)


def pytest_configure(config):
    RunningKernel.execute_cell_input = _execute_cell_input
