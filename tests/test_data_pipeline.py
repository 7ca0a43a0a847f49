"""TFDS array_record builders + grain pipeline: no TensorFlow, checkpointable, per-host split."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sleep_jax.data import builders, pipeline
from sleep_jax.data.tokenizer import ByteTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Facts(builders.TextRecordsBuilder):
  """The subclassing pattern later tasks use (text + int fields, two splits)."""
  name = "test_facts"
  TEXT_FIELDS = ("text", "answer")
  INT_FIELDS = ("person",)
  SPLITS = ("train", "test")

  def generate(self, split):
    n = 40 if split == "train" else 5
    for i in range(n):
      yield {"text": f"person {i} of {split} likes item {i % 7}.", "answer": f"{i % 7}",
             "person": i}


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
  return builders.prepare(Facts, str(tmp_path_factory.mktemp("tfds")))


def _all_texts(source):
  return sorted(bytes(source[i]["text"]).decode() for i in range(len(source)))


def test_no_tensorflow_anywhere(tmp_path):
  code = (
      "import sys; sys.path.insert(0, %r)\n"
      "import sleep_jax.data.pipeline, sleep_jax.data.builders as b\n"
      "assert 'tensorflow' not in sys.modules\n"
      "src = b.prepare(b.TinyCorpus, %r).as_data_source('test')\n"
      "from sleep_jax.data.tokenizer import ByteTokenizer\n"
      "it = iter(sleep_jax.data.pipeline.lm_dataset(src, ByteTokenizer(), seq_len=16, "
      "batch_size=2, seed=0))\n"
      "next(it)\n"
      "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n") % (REPO, str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_builder_writes_array_record_and_reads_back(facts):
  info_dir = facts.data_dir
  assert any(f.endswith("array_record-00000-of-00001") for f in os.listdir(info_dir))
  train = facts.as_data_source("train")
  assert len(train) == 40 and len(facts.as_data_source("test")) == 5
  texts = _all_texts(train)
  assert texts == sorted(f"person {i} of train likes item {i % 7}." for i in range(40))
  rec = train[0]
  assert set(rec) == {"text", "answer", "person"}
  assert bytes(rec["answer"]).decode() == str(int(rec["person"]) % 7)
  # Read back without the builder class (what a later job does with a prepared data_dir).
  again = builders.load_from_directory(info_dir).as_data_source("train")
  assert _all_texts(again) == texts


def test_text_builder_from_generators(tmp_path):
  cls = builders.text_builder("gen_words", {"train": lambda: ({"text": w} for w in "a b c".split())})
  src = builders.prepare(cls, str(tmp_path)).as_data_source("train")
  assert _all_texts(src) == ["a", "b", "c"]


def test_pack_mode_rows(facts):
  tok = ByteTokenizer()
  src = facts.as_data_source("train")
  it = iter(pipeline.lm_dataset(src, tok, seq_len=24, batch_size=4, seed=0, mode="pack"))
  batch = next(it)
  assert batch["tokens"].shape == (4, 24) and batch["tokens"].dtype == np.int32
  assert batch["valid"].all()  # packing leaves no padding
  seg, pos = batch["segment_ids"], batch["positions"]
  assert not batch["loss_mask"][pos == 0].any()  # never predict a document's first token
  assert batch["loss_mask"][(pos > 0)].all()
  starts = np.zeros_like(seg, bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]  # a new document begins inside the row
  assert starts.any() and (batch["tokens"][starts] == tok.bos_id).all()
  assert not batch["loss_mask"][starts].any()
  assert (np.diff(seg, axis=1) >= 0).all()
  text = tok.decode(batch["tokens"][0])
  assert "likes item" in text or "of train" in text


def test_pad_mode_rows(facts):
  tok = ByteTokenizer()
  src = facts.as_data_source("train")
  batch = next(iter(pipeline.lm_dataset(src, tok, seq_len=64, batch_size=3, seed=1, mode="pad",
                                        shuffle=False)))
  for row, valid in zip(batch["tokens"], batch["valid"]):
    n = int(valid.sum())
    assert valid[:n].all() and not valid[n:].any()
    assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id and (row[n:] == tok.pad_id).all()
    assert tok.decode(row[:n]).startswith("person ")
  np.testing.assert_array_equal(batch["loss_mask"], batch["valid"])


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_iterator_state_resumes_exactly(facts, mode):
  src = facts.as_data_source("train")
  make = lambda: iter(pipeline.lm_dataset(src, ByteTokenizer(), seq_len=20, batch_size=4,
                                          seed=3, mode=mode))
  it = make()
  for _ in range(13):  # past one epoch: the state crosses an epoch boundary
    next(it)
  state = json.loads(json.dumps(pipeline.iterator_state(it)))  # as stored in a checkpoint
  expected = [next(it) for _ in range(5)]
  resumed = pipeline.restore_iterator(make(), state)
  for e in expected:
    got = next(resumed)
    for k in e:
      np.testing.assert_array_equal(got[k], e[k])


def test_shuffle_is_seeded_and_hosts_split_the_data(facts):
  src = facts.as_data_source("train")
  tok = ByteTokenizer()
  rows = lambda seed, **kw: [tok.decode(r) for b in pipeline.lm_dataset(
      src, tok, seq_len=64, batch_size=4, seed=seed, mode="pad", num_epochs=1, **kw) for r in
      b["tokens"]]
  assert rows(0) == rows(0) and rows(0) != rows(1)
  hosts = [rows(0, process_index=i, process_count=2) for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 20
  assert not set(hosts[0]) & set(hosts[1])
  assert sorted(hosts[0] + hosts[1]) == sorted(rows(0))
