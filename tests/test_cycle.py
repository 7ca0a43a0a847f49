"""The wake/sleep driver: resume after a kill mid-sleep, documents files, outputs."""

import json
import os

import pytest

from sleep_jax.configs import knowledge
from sleep_jax.data import documents
from sleep_jax.sleep import cycle, methods


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("base"))


def _config(base_cache, methods=("sleep",)):
  c = knowledge.get_config("test")
  c.methods = tuple(methods)
  c.base_cache = base_cache
  return c


def _kill_and_resume(tmp_path, base_cache, method):
  ref = cycle.run_experiment(_config(base_cache, (method,)), str(tmp_path / "ref"),
                             log=lambda *_: None)

  def kill(phase, chunk, step):
    if phase == "consolidation" and chunk == 1 and step == 1:
      raise cycle.Interrupted("simulated kill in the middle of the second sleep")

  work = str(tmp_path / "killed")
  with pytest.raises(cycle.Interrupted):
    cycle.run_experiment(_config(base_cache, (method,)), work, hook=kill, log=lambda *_: None)
  assert not os.path.exists(os.path.join(work, "runs", method, "seed_0", "result.json"))
  resumed = cycle.run_experiment(_config(base_cache, (method,)), work, log=lambda *_: None)
  a = ref["methods"][method]["seeds"]["0"]
  b = resumed["methods"][method]["seeds"]["0"]
  assert a["params_sha1"] == b["params_sha1"]
  assert a["R"] == b["R"] and a["answers"] == b["answers"]
  for f in ("results.json", "results.md", "plots/accuracy_matrices.png"):
    assert os.path.exists(os.path.join(work, f))


def test_resume_after_kill_mid_sleep_equals_uninterrupted(tmp_path, base_cache):
  """Consolidation and deep sleep (the compile-light path of the driver)."""
  _kill_and_resume(tmp_path, base_cache, "sleep_no_dream")


@pytest.mark.slow
def test_resume_with_dreaming_equals_uninterrupted(tmp_path, base_cache):
  _kill_and_resume(tmp_path, base_cache, "sleep")


def test_documents_file_runs_end_to_end(tmp_path, base_cache):
  path = tmp_path / "docs.jsonl"
  rows = [{"id": "a", "passage": "Ada was born in 1950 .",
           "questions": [{"q": "When was Ada born?", "answer": "1950", "aliases": ["in 1950"]}]},
          {"id": "b", "passage": "Bo works for Tekcorp .",
           "questions": [{"q": "Who employs Bo?", "answer": "Tekcorp"}],
           "train_questions": [{"q": "Where does Bo work?", "answer": "Tekcorp"}]}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  c = _config(base_cache, methods=("sleep_no_dream",))
  c.data.source, c.data.documents, c.data.chunk_size = "jsonl", str(path), 2
  res = cycle.run_experiment(c, str(tmp_path / "run"), log=lambda *_: None)
  ans = res["methods"]["sleep_no_dream"]["seeds"]["0"]["answers"]
  assert [a["doc"] for a in ans] == ["a", "b"]
  assert ans[0]["gold"] == ["1950", "in 1950"] and isinstance(ans[0]["pred"], str)


@pytest.mark.parametrize("line,msg", [
    ("{not json", "bad.jsonl:2: not valid JSON"),
    ('{"id": 1, "passage": "x"}', "bad.jsonl:2: 'questions' must be a non-empty list"),
    ('{"id": 1, "passage": "x", "questions": [{"q": "?"}]}', "bad.jsonl:2: every entry"),
    ('{"id": 1, "passage": "x", "questions": [{"q": "?", "answer": "a"}], "extra": 1}',
     "unknown fields"),
])
def test_malformed_documents_name_the_line(tmp_path, line, msg):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"id": 0, "passage": "ok", "questions": [{"q": "?", "answer": "a"}]}\n' + line + "\n")
  with pytest.raises(documents.DocumentError, match=msg):
    documents.load_jsonl(str(p))


def test_unknown_method_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown method 'slep'. Did you mean 'sleep'"):
    methods.get("slep")
