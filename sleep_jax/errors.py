"""What can stop a run, and how the command line reports it (``sleep_jax.main``).

* ``UserError``: a mistake in the user's input (a config value, a file, the workdir). The command
  prints one ``error: ...`` line that names the problem and the fix and exits 2, no traceback
  (``--debug`` or ``SLEEP_JAX_DEBUG=1`` shows it).
* ``NonFiniteError``: training diverged (a NaN or inf loss or parameter). The run stops before the
  bad state is checkpointed or scored; one ``error:`` line, exit 3.
* ``Preempted``: SIGTERM arrived; the run stopped at the next safe point with its last
  checkpoint on disk (the cycle's is the last phase boundary). Exit 0.

Anything else is an internal error and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
  """A mistake in the user's input; the message names the problem and the fix."""


class NonFiniteError(RuntimeError):
  """A loss or parameter became NaN/inf; the message names method, seed, chunk, phase, step."""


class Preempted(Exception):
  """SIGTERM: the run stopped with its last checkpoint on disk; the same command resumes."""
