"""Bad inputs through the real command line: exit code 2, one ``error:`` line naming the problem,
no traceback, and the workdir's existing files byte-identical afterwards."""

import concurrent.futures
import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST = "--config=sleep_jax/configs/knowledge.py:test"
GOOD_DOC = {"id": "a", "passage": "Ada was born in 1950 .",
            "questions": [{"q": "When was Ada born?", "answer": "1950"}]}


def _files(tmp):
  """Input files of the cases, written once."""
  f = {}
  f["docs_latin1"] = tmp / "latin1.jsonl"
  f["docs_latin1"].write_bytes(json.dumps(GOOD_DOC).encode() + b"\n" +
                               '{"id": "b", "passage": "Caf\xe9"}'.encode("latin-1") + b"\n")
  f["docs_badjson"] = tmp / "bad.jsonl"
  f["docs_badjson"].write_text(json.dumps(GOOD_DOC) + "\n{oops\n")
  f["docs_noq"] = tmp / "noq.jsonl"
  f["docs_noq"].write_text(json.dumps({"id": "a", "passage": "x"}) + "\n")
  f["docs_untitled"] = tmp / "untitled.jsonl"
  f["docs_untitled"].write_text(json.dumps(GOOD_DOC) + "\n")
  f["docs_empty"] = tmp / "empty.jsonl"
  f["docs_empty"].write_text("\n")
  f["not_gguf"] = tmp / "model.gguf"
  f["not_gguf"].write_text("not a model")
  f["a_file"] = tmp / "a_file"
  f["a_file"].write_text("x")
  cache = tmp / "corrupt_base"  # a cached base whose params are truncated
  cache.mkdir()
  (cache / "base_model.json").write_text("{}")
  f["corrupt_base"] = cache
  return f


def _cases(f, tmp):
  """(name, extra args, expected words in the error line, workdir or None for the default)."""
  d = "--config.data.source=jsonl"
  locked = tmp / "locked"
  locked.mkdir()
  (locked / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                            "since": "earlier"}))
  return [
      ("config file missing", ["--config=nope.py"], ["nope.py", "not found"]),
      ("unknown variant", ["--config=sleep_jax/configs/knowledge.py:tset"], ["unknown variant",
                                                                            "tset"]),
      ("no --config", [], ["--config", "required"]),
      ("no --workdir", [TEST, "NO_WORKDIR"], ["--workdir", "required"]),
      ("mistyped key", [TEST, "--config.consolidaton.steps=3"], ["consolidaton",
                                                                 "consolidation"]),
      ("value of the wrong type", [TEST, "--config.consolidation.steps=abc"], ["steps", "int"]),
      ("unknown method", [TEST, "--config.methods=('slep',)"], ["unknown method", "sleep"]),
      ("no methods", [TEST, "--config.methods=()"], ["methods", "empty"]),
      ("no seeds", [TEST, "--config.seeds=()"], ["seeds"]),
      ("negative seed", [TEST, "--config.seeds=(-1,)"], ["seeds", ">= 0"]),
      ("zero steps", [TEST, "--config.consolidation.steps=0"], ["consolidation.steps",
                                                                "positive"]),
      ("zero batch", [TEST, "--config.sft.batch_size=0"], ["sft.batch_size", "positive"]),
      ("unknown metric", [TEST, "--config.eval.metric=f1"], ["eval.metric", "contains"]),
      ("unknown replay items", [TEST, "--config.consolidation.replay_items=all"],
       ["consolidation.replay_items", "dreams_kept"]),
      ("unknown source", [TEST, "--config.data.source=csv"], ["data.source", "csv"]),
      ("jsonl without a path", [TEST, d], ["documents", "--config.data.documents"]),
      ("documents missing", [TEST, d, "--config.data.documents=/nonexistent.jsonl"],
       ["/nonexistent.jsonl", "cannot read"]),
      ("documents a directory", [TEST, d, f"--config.data.documents={tmp}"],
       ["cannot read", str(tmp)]),
      ("documents not UTF-8", [TEST, d, f"--config.data.documents={f['docs_latin1']}"],
       [f"{f['docs_latin1']}:2", "UTF-8"]),
      ("documents bad JSON", [TEST, d, f"--config.data.documents={f['docs_badjson']}"],
       [f"{f['docs_badjson']}:2", "not valid JSON"]),
      ("documents without questions", [TEST, d, f"--config.data.documents={f['docs_noq']}"],
       ["questions"]),
      ("documents empty", [TEST, d, f"--config.data.documents={f['docs_empty']}"],
       ["no documents"]),
      ("keyed slots, a document without a title",
       [TEST, d, f"--config.data.documents={f['docs_untitled']}", "--config.model_slot_keys=4",
        "--config.model_slot_key_len=2"], ["model_slot_keys", "'a'", "title"]),
      ("model file missing", [TEST, "--config.model_source=gguf", "--config.gguf=/nope.gguf"],
       ["/nope.gguf", "cannot read"]),
      ("model file not GGUF", [TEST, "--config.model_source=gguf",
                               f"--config.gguf={f['not_gguf']}"], ["not a GGUF file"]),
      ("workdir is a file", [TEST, f"WORKDIR={f['a_file']}"], ["is a file"]),
      ("workdir locked", [TEST, f"WORKDIR={locked}"], ["in use by", f"pid {os.getpid()}"]),
      ("corrupt cached base", [TEST, "--config.methods=('base',)",
                               f"--config.base_cache={f['corrupt_base']}"],
       [str(f["corrupt_base"]), "delete"]),
      ("unknown on_config_change", [TEST, "--config.on_config_change=keep"],
       ["on_config_change", "restart"]),
  ]


def _digest(path):
  out = {}
  for r, _, fs in os.walk(path):
    for name in fs:
      p = os.path.join(r, name)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.sha1(fh.read()).hexdigest()
  return out


def _run(args, workdir):
  argv = [a for a in args if a != "NO_WORKDIR" and not a.startswith("WORKDIR=")]
  explicit = [a[len("WORKDIR="):] for a in args if a.startswith("WORKDIR=")]
  if "NO_WORKDIR" not in args:
    argv.append(f"--workdir={explicit[0] if explicit else workdir}")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  env.pop("SLEEP_JAX_DEBUG", None)
  return subprocess.run([sys.executable, "-m", "sleep_jax.main", *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_bad_inputs_give_one_error_line_and_exit_2(tmp_path):
  f = _files(tmp_path)
  cases = _cases(f, tmp_path)
  assert len(cases) >= 20
  workdirs = []
  for i, _ in enumerate(cases):  # an existing workdir with a finished-looking file in it
    w = tmp_path / f"work{i}"
    (w / "runs").mkdir(parents=True)
    (w / "runs" / "keep.json").write_text('{"kept": true}')
    workdirs.append(w)
  before = [_digest(w) for w in workdirs]
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    procs = list(pool.map(lambda cw: _run(cw[0][1], cw[1]), zip(cases, workdirs)))
  failures = []
  for (name, _, words), w, b, p in zip(cases, workdirs, before, procs):
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    ok = (p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
          and all(x.lower() in lines[0].lower() for x in words)
          and "Traceback" not in p.stderr + p.stdout
          and {k: v for k, v in _digest(w).items() if k in b} == b)  # existing files kept
    if not ok:
      failures.append(f"{name}: rc={p.returncode} stderr={p.stderr[-600:]!r}")
  assert not failures, "\n".join(failures)
  assert json.loads((tmp_path / "locked" / ".lock").read_text())["pid"] == os.getpid()


def test_debug_shows_the_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", SLEEP_JAX_DEBUG="1")
  p = subprocess.run([sys.executable, "-m", "sleep_jax.main", TEST, "--config.methods=('slep',)",
                      f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode != 0 and "Traceback" in p.stderr and "unknown method" in p.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_workdir(tmp_path):
  w = tmp_path / "ro"
  w.mkdir()
  w.chmod(0o500)
  p = _run([TEST], w)
  assert p.returncode == 2 and p.stderr.startswith("error: ") and "not writable" in p.stderr


def test_help_lists_config_files_variants_and_methods():
  from sleep_jax.configs import loader
  from sleep_jax.sleep import methods
  p = subprocess.run([sys.executable, "-m", "sleep_jax.main", "--help"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert p.returncode == 0, p.stderr
  here = os.path.join(ROOT, "sleep_jax", "configs")
  for name in ("default.py", "knowledge.py", "few_shot.py", "long_horizon.py"):
    assert f"  {name}: " in p.stdout
    module = loader.load_module(os.path.join(here, name))
    for variant in module.HELP:  # every listed variant exists
      assert f":{variant} " in p.stdout and module.get_config(variant) is not None
  for m in methods.METHODS:
    assert f"  {m} " in p.stdout
  assert "--config=sleep_jax/configs/knowledge.py --workdir=" in p.stdout
