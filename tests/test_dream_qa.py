"""Dreams about the passage: the prompts hold it, the written questions are parsed into (q, a)
pairs, their quality is measured, and they become query-format consolidation items."""

import types

from sleep_jax.configs import knowledge
from sleep_jax.data import documents
from sleep_jax.data.tokenizer import ByteTokenizer
from sleep_jax.sleep import dream_qa
from sleep_jax.tasks import base as task_lib

PASSAGE = "The Korrin engine was designed by Oda Felk in 1851. It had three cylinders."


def test_dream_prompts_contain_the_passage():
  fmt = documents.WorldFormat(ByteTokenizer())
  doc = documents.Document("k", PASSAGE, (), ())
  setup = task_lib.Setup(None, None, ByteTokenizer(), fmt, [[doc]], {}, {})
  templates = knowledge.get_config("smollm2").dreaming.templates
  [prompt] = task_lib.dream_prompts(setup, [doc], templates)
  text = ByteTokenizer().decode(prompt)
  assert PASSAGE in text and "Write three questions about this text" in text


def test_written_questions_are_parsed_into_pairs():
  cases = {
      "Q: Who designed the Korrin engine?\nA: Oda Felk\nQ: How many cylinders did it have?\n"
      "A: three.": [("Who designed the Korrin engine?", "Oda Felk"),
                    ("How many cylinders did it have?", "three")],
      "Question 1: When was the engine designed?\nAnswer 1: 1851":
          [("When was the engine designed?", "1851")],
      "Here are three questions:\n\n1. Who designed the Korrin engine?\n   - Oda Felk\n"
      "2. When was it designed? 1851": [("Who designed the Korrin engine?", "Oda Felk"),
                                        ("When was it designed?", "1851")],
      "The Korrin engine was a great machine.": [],
  }
  for text, want in cases.items():
    assert dream_qa.parse_qa_pairs(text) == want, text


def test_quality_and_query_format_items():
  texts = ["Q: Who designed the Korrin engine?\nA: Oda Felk",  # about it, supported
           "Q: Who painted the lighthouse of Velmora?\nA: Ilse Maren",  # well-formed only
           "no questions here"]
  q = dream_qa.quality(texts, [PASSAGE] * 3)
  assert q == {"dream_wellformed": 2 / 3, "dream_about_passage": 1 / 3,
               "dream_supported": 1 / 3}
  fmt = documents.WorldFormat(ByteTokenizer())
  teacher, student = dream_qa.qa_items(fmt, [(PASSAGE, "Who designed it?", "Oda Felk")])
  dec = ByteTokenizer().decode
  assert PASSAGE in dec(teacher[0]) and dec(teacher[0]).endswith("Who designed it? A:")
  assert PASSAGE not in dec(student[0]) and "Who designed it?" in dec(student[0])


def test_continuation_quality_names_the_entity_and_counts_what_the_passage_says():
  passage = "Mara Quillon was born in 1962 in Tarsk. She worked as a glassblower in Tarsk."
  texts = ["Mara Quillon was born in 1962 in Tarsk and liked the sea.",  # about, 6 of 9 3-grams
           "the weather was cold and the river froze over",  # neither
           ""]
  q = dream_qa.continuation_quality(texts, [passage] * 3)
  assert q["dream_about_passage"] == 1 / 3
  assert abs(q["dream_trigrams_in_passage"] - (6 / 9) / 3) < 1e-9
  assert dream_qa.continuation_quality([], []) == {"dream_about_passage": 0.0,
                                                  "dream_trigrams_in_passage": 0.0}


def test_title_templates_and_query_format_student_prompts():
  """World documents carry their person's name; a dream template may ask for it, and the
  student of such a dream is asked the template without the passage (the query format)."""
  from sleep_jax.data import world as world_lib
  from sleep_jax.sleep import dream_phase
  from sleep_jax.tasks import pretrain
  w = world_lib.World(pretrain.runlocal().world)
  fmt = documents.WorldFormat(w.tokenizer)
  docs = documents.world_documents(w, w.chunk(0)[:2])
  p = w.chunk(0)[1]
  assert docs[1].title == f"{p.first} {p.last}"
  templates = {"continue": "{context}", "name": "{context} Q: {title}"}
  setup = types.SimpleNamespace(fmt=fmt)
  prompts = task_lib.dream_prompts(setup, docs, templates)
  assert w.tokenizer.decode(prompts[3]).endswith(f"Q: {p.first} {p.last}")
  student = dream_phase.template_student_prompts(fmt, docs, templates, [3, 2, -1])
  assert w.tokenizer.decode(student[0]).strip() == f"Q: {p.first} {p.last}"
  assert student[1] == fmt.bos() and student[2] == fmt.bos()  # "{context}" alone: bos
