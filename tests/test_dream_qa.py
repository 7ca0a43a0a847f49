"""Dreams about the passage: the prompts hold it, the written questions are parsed into (q, a)
pairs, their quality is measured, and they become query-format consolidation items."""

import types

import numpy as np
import pytest

from sleep_jax.configs import knowledge, knowledge_smollm2
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
  from sleep_jax.tasks import pretrain_recipe
  w = world_lib.World(pretrain_recipe.runlocal().world)
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


def test_consolidation_template_items_one_per_template_and_document():
  """Several consolidation templates (rewrites of each passage): one item per (template,
  document); the teacher's prompt holds the passage and the student's does not."""
  tok = ByteTokenizer()
  fmt = documents.WorldFormat(tok)
  docs = [documents.Document("k", PASSAGE, (), (), title="Korrin engine"),
          documents.Document("v", "Velmora is a town.", (), (), title="Velmora")]
  setup = types.SimpleNamespace(fmt=fmt)
  tpls = ("{context} Rewrite this text about {title}.", "{context} List the facts about {title}.")
  teacher, student = task_lib.template_items(setup, docs, tpls)
  assert len(teacher) == len(student) == 4
  text = [tok.decode(t) for t in teacher]
  assert PASSAGE in text[0] and text[3].endswith("List the facts about Velmora.")
  assert [tok.decode(s).strip() for s in student] == [
      "Rewrite this text about Korrin engine.", "Rewrite this text about Velmora.",
      "List the facts about Korrin engine.", "List the facts about Velmora."]
  assert task_lib.template_items(setup, docs, tpls[0]) == tuple(
      x[:2] for x in (teacher, student))


def test_closed_book_view_hides_exactly_the_passage():
  """Dreams from a ``{title}`` template are tried closed-book: of the prompt only bos and the
  template's question opening stay visible, so with positions counted over visible tokens the
  row reads exactly as the student's ``Q: <title>`` + the dream; a template without
  ``{title}`` is refused."""
  import numpy as np
  import pytest
  from sleep_jax.data import world as world_lib
  from sleep_jax.sleep import dream_batches, dream_inputs
  from sleep_jax.tasks import pretrain_recipe
  w = world_lib.World(pretrain_recipe.runlocal().world)
  fmt = documents.WorldFormat(w.tokenizer)
  docs = documents.world_documents(w, w.chunk(0)[:2])
  templates = {"question": "{context} Q: {title}"}
  prompts = task_lib.dream_prompts(types.SimpleNamespace(fmt=fmt), docs, templates)
  comps = [w.tokenizer.encode("was born in which year? A: 1950"), w.tokenizer.encode("A: x")]
  dreams = dream_batches.fixed_dreams(prompts, comps, w.tokenizer.pad_id)
  view = dream_inputs.closed_book_view(fmt, docs, templates)(dreams, np.array([0, 1]))
  toks, valid = np.asarray(view.tokens), np.asarray(view.valid)
  for r, (d, c) in enumerate(zip(docs, comps)):
    assert toks[r][valid[r]].tolist() == fmt.dream_prompt("", templates["question"], d.title) + c
  assert np.array_equal(np.asarray(view.completion_mask), np.asarray(dreams.completion_mask))
  with pytest.raises(ValueError, match="trial_view='closed_book'"):
    dream_inputs.closed_book_view(fmt, docs, {"continue": "{context}"})


def test_dreams_as_rows_take_a_prefix_per_row():
  """sft_selfgen studies a dream written after ``Q: <name>`` after that opening: per-row
  prefixes, loss from the end of each prefix."""
  import numpy as np
  from sleep_jax.sleep import dream_batches, phases
  dreams = dream_batches.fixed_dreams([[1, 9, 9], [1, 8]], [[5, 6], [7]], 0)
  out = phases.dreams_as_rows(dreams, [[1, 4, 4], [1]], 8, 0)
  assert np.asarray(out["tokens"])[:, :4].tolist() == [[1, 4, 4, 5], [1, 7, 0, 0]]
  assert np.asarray(out["loss_mask"])[0, :6].tolist() == [False] * 3 + [True] * 2 + [False]
  single = phases.dreams_as_rows(dreams, [1], 8, 0)
  assert np.asarray(single["tokens"])[:, :3].tolist() == [[1, 5, 6], [1, 7, 0]]


def test_fact_coverage_counts_the_passage_facts_a_dream_answers():
  q = documents.Question
  docs = [documents.Document("a", "P1", (q("Who?", "Oda Felk"), q("When?", "1851")), ()),
          documents.Document("b", "P2", (q("Where?", "Kiev"),), (q("Where else?", "Kiev"),))]
  triples = [("P1", "Who designed it?", "oda felk."), ("P2", "When?", "1851")]
  assert dream_qa.fact_coverage(triples, docs) == 1 / 3  # 1851 is P1's fact, not P2's
  assert dream_qa.fact_coverage([], docs) == 0.0


def test_focused_documents_read_each_sentence_again_last():
  doc = documents.Document("k", PASSAGE, (), (), title="Korrin")
  docs, originals = dream_qa.focused_documents([doc], "sentences")
  assert [d.passage for d in docs] == [f"{PASSAGE} The Korrin engine was designed by Oda Felk "
                                       "in 1851.", f"{PASSAGE} It had three cylinders."]
  assert originals == [PASSAGE, PASSAGE] and {d.title for d in docs} == {"Korrin"}
  assert dream_qa.focused_documents([doc]) == ([doc], [PASSAGE])


def test_decoy_questions_ask_about_mixed_names_of_no_one():
  """consolidation.decoys: a dream question with its entity renamed to a mix of two of the
  chunk's names, never a real one of them, as many as asked."""
  docs = [types.SimpleNamespace(passage=f"p{i}", title=t)
          for i, t in enumerate(["Ana Belov", "Tom Kirson", "Eli Marov"])]
  triples = [("p0", "When was Ana Belov born?", "1960"), ("p1", "Where does Tom Kirson work?", "X"),
             ("p2", "A question without the name?", "y")]
  out = dream_qa.decoy_questions(triples, docs, np.random.default_rng(0), 4.0)
  assert 0 < len(out) <= 12
  titles = {d.title for d in docs}
  for q in out:
    assert not any(t in q for t in titles)
    name = q.replace("When was ", "").replace(" born?", "").replace("Where does ", "")
    name = name.replace(" work?", "")
    first, last = name.split()
    assert first in {"Ana", "Tom", "Eli"} and last in {"Belov", "Kirson", "Marov"}
  assert dream_qa.decoy_questions(triples, docs, np.random.default_rng(0), 0.0) == []


def test_entity_copy_spans_and_query_heads():
  """dreaming.copy_title: one span per (document, template) holding the title's tokens, the
  setup's entity-start tokens as trigger; the dream is studied after the template's opening."""
  tok = ByteTokenizer()
  fmt = documents.WorldFormat(tok)
  docs = [documents.Document("a", "Ana Belov was born in 1960.", (), (), title="Ana Belov"),
          documents.Document("b", "Eli Ro works at X.", (), (), title="Eli Ro")]
  starts = np.zeros(300, bool)
  setup = task_lib.Setup(None, None, tok, fmt, [docs], {}, {}, entity_starts=starts)
  tpl = {"question": "{context} Q:"}
  spans, lens, trigger = task_lib.entity_copy(setup, docs, tpl, True)
  assert lens.tolist() == [len(tok.encode("Ana Belov")), len(tok.encode("Eli Ro"))]
  assert spans[1, :lens[1]].tolist() == tok.encode("Eli Ro") and trigger is starts
  assert task_lib.entity_copy(setup, docs, tpl, False) is None
  assert task_lib.dream_heads(fmt, docs, tpl, copy_title=True) == [fmt.dream_prompt("", "{context} Q:")] * 2
  assert task_lib.dream_heads(fmt, docs, tpl) == [fmt.bos()] * 2
  setup.entity_starts = None
  with pytest.raises(ValueError, match="copy_title"):
    task_lib.entity_copy(setup, docs, tpl, True)


def test_question_templates_named_pairs_and_qa_trial_rows():
  """A template opens a question only when it ends in the entity's name (an instruction that
  names it does not: the dream after it is the model's own text); ``qa_named`` keeps the
  questions that name the entity in full; a dream's ``qa`` trial row is its question asked
  closed-book with the reader's answer, and a dream without one gets no completion."""
  assert task_lib.opens_question("{context} Q: {title}")
  assert not task_lib.opens_question(knowledge_smollm2.QA_LAYOUT)
  assert task_lib.opens_question("{context} Q:", copy_title=True)
  text = "Q: Who designed the Korrin engine?\nA: Oda Felk\nQ: When was it built?\nA: 1851"
  assert dream_qa.entity_pairs(text, "Korrin engine", named=True) == [
      ("Who designed the Korrin engine?", "Oda Felk")]
  assert len(dream_qa.entity_pairs(text, "Korrin engine", named=False)) == 2
  assert dream_qa.entity_pairs(text, "Korrin", named=True)  # the whole title, as given
  assert not dream_qa.entity_pairs(text, "Oda Felk", named=True)
  tok = ByteTokenizer()
  fmt = documents.WorldFormat(tok)
  prompts, comps = dream_qa.trial_rows(
      fmt, [(PASSAGE, "Who designed the Korrin engine?"), None], [tok.encode("Oda Felk")])
  assert prompts[0] == fmt.closed_book("Who designed the Korrin engine?")
  assert comps == [tok.encode("Oda Felk") + [fmt.stop_ids[0]], []]
