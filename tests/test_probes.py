"""Forgetting probes (KL to base on generic prompts, known facts) and the fictional-documents set."""

import importlib.util
import json
import os

import jax
import pytest

from sleep_jax.data import documents
from sleep_jax.data.tokenizer import ByteTokenizer
from sleep_jax.eval import kl_probe
from sleep_jax.model import fetch, transformer
from sleep_jax.model.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(__file__))
EXP = os.path.join(ROOT, "experiments", "knowledge_incorporation")


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXP, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                    d_ff=(64,), n_experts=(1,), chunk_sizes=(1,), n_slots=1, slot_rank=4,
                    init_std=0.5)
  params = jax.jit(transformer.init, static_argnums=1)(jax.random.PRNGKey(0), cfg)
  return cfg, params


def test_kl_probe_is_zero_on_the_base_and_grows_with_a_change(tiny):
  cfg, params = tiny
  tok = ByteTokenizer()
  prompts = [tok.encode(t) for t in kl_probe.read_prompts()[:10]]
  assert len(kl_probe.read_prompts()) >= 50
  probe = kl_probe.build(params, cfg, prompts, stop_ids=(tok.eos_id,), pad_id=tok.pad_id,
                         new_tokens=4, batch_size=4)
  # The mask covers exactly each base continuation (+ its end token), starting at the prompt's
  # last position.
  assert probe.mask.sum(axis=1).min() >= 1
  assert (probe.mask <= probe.valid).all()
  for i, p in enumerate(prompts):
    assert probe.mask[i, len(p) - 1] and not probe.mask[i, :len(p) - 1].any()
  assert kl_probe.kl_to_base(probe, params, params, cfg, batch_size=3) == 0.0
  moved = jax.tree.map(lambda x: x * 1.05, params)
  small = kl_probe.kl_to_base(probe, params, moved, cfg, batch_size=3)
  bigger = kl_probe.kl_to_base(probe, params, jax.tree.map(lambda x: x * 1.3, params), cfg)
  assert 0.0 < small < bigger


def test_known_facts_file_is_a_closed_book_document():
  doc = documents.known_facts(documents.KNOWN_FACTS_SMOLLM2)
  assert len(doc.eval_questions) >= 100 and doc.passage == "" and not doc.train_questions
  with open(documents.KNOWN_FACTS_SMOLLM2) as f:
    rows = [json.loads(line) for line in f]
  # Every kept question was answered correctly by the base when the file was written.
  from sleep_jax.eval.qa import score_answers
  sc = score_answers([r["base_answer"] for r in rows], [[r["answer"], *r["aliases"]] for r in rows])
  assert sc["contains"].all()


@pytest.mark.slow
@pytest.mark.skipif(fetch.find_smollm2() is None, reason="SmolLM2 not fetched")
def test_smollm2_base_scores_100_on_known_facts_and_0_kl():
  from sleep_jax.configs import knowledge
  from sleep_jax.eval import answers
  from sleep_jax.tasks import models, world
  c = knowledge.get_config("smollm2")
  c.data.source, c.data.documents = "jsonl", os.path.join(EXP, "documents_example.jsonl")
  c.eval.kl_prompts = 8
  model = models.load(c, "/nonexistent")
  s = world.jsonl_setup(c, model)
  r = answers.retention(s, s.params, transformer.slot_mask_none(s.cfg), c.eval)
  assert r == {"known_facts": 1.0, "kl_to_base": 0.0}


def test_documents_set_generator(tmp_path):
  gen = _load("make_documents")
  docs = gen.make(48, seed=0)
  assert docs == gen.make(48, seed=0) and docs != gen.make(48, seed=1)
  kinds = {d["id"].split("-")[0] for d in docs}
  assert len(docs) >= 40 and len(kinds) >= 6
  for d in docs:
    assert len(d["questions"]) == 3
    trains = {q["q"] for q in d["train_questions"]}
    for q in d["questions"]:
      assert q["answer"] in d["passage"]  # answers verbatim in the passage
      assert q["q"] not in trains and q["q"] not in d["passage"]  # paraphrased, held out
  assert any(q.get("aliases") for d in docs for q in d["questions"])
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps(d) + "\n" for d in docs))
  loaded = documents.load_jsonl(str(path))
  assert [d.id for d in loaded] == [d["id"] for d in docs]
  shipped = documents.load_jsonl(os.path.join(EXP, "documents_fictional.jsonl"))
  assert [d.passage for d in shipped] == [d["passage"] for d in docs]  # seed 0, n 48
