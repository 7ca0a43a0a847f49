"""Two JAX processes over localhost (CPU collectives over gloo) run a tiny sleep on a mesh that
spans both, and end with the parameters of the same sleep in one process
(``scripts/two_process_sleep.py``)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "two_process_sleep.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(args, **kw):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen([sys.executable, SCRIPT] + args, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kw)


# Three processes (the reference and the pair) on the CI's two cores: ~2.5 minutes, and the gloo
# collectives crawl while the other test worker competes for the cores.
@pytest.mark.slow
def test_two_processes_sleep_like_one(tmp_path):
  ref, two = str(tmp_path / "ref.npz"), str(tmp_path / "two.npz")
  port = str(_free_port())
  procs = [_run(["--out", ref])]
  procs += [_run(["--out", two, "--processes", "2", "--process_id", str(i), "--port", port])
            for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
  a, b = np.load(ref), np.load(two)
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], atol=1e-4, rtol=1e-4, err_msg=k)
