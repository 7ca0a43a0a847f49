"""The knowledge experiment on the real SmolLM2-135M-Instruct: the ``smollm2*`` variants of
``knowledge.py`` (``--config=sleep_jax/configs/knowledge.py:smollm2_docs_written``), which
``apply`` sets on its base config (this is not a config file of its own). The model is the
fetched GGUF (``python -m sleep_jax.model.fetch``); the documents are the project's fictional
set (experiments/knowledge_incorporation/make_documents.py) or the user's
(``--config.data.source=jsonl --config.data.documents=FILE``).
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

VARIANTS = ("smollm2", "smollm2_gpu", "smollm2_docs", "smollm2_docs_gpu", "smollm2_docs_written",
            "smollm2_docs_written_gpu")  # their one-line help: ``knowledge.HELP``

# SmolLM2's dream template (experiments/knowledge_incorporation/probe_dream_quality.py).
QA_LAYOUT = ("{context}\n\nWrite three questions about {title} that this text answers. Write "
             "each as \"Q: <question>\" on one line and \"A: <short answer from the text>\" on "
             "the next.")


# SmolLM2's passage items (``consolidation.prompt_templates``): the model reading it rewrites it.
REWRITES = ("{context}\n\nRewrite this text about {title} in your own words.",
            "{context}\n\nList every fact this text gives about {title}, one per line.")


def apply(c: ml_collections.ConfigDict, variant: str, all_methods: Sequence[str]) -> None:
  """Sets ``variant`` (one of ``VARIANTS``) on the knowledge experiment's base config ``c``;
  ``all_methods``: every method and ablation of the experiment (``knowledge.ALL_METHODS``)."""
  # The same driver on the real SmolLM2-135M-Instruct (``python -m sleep_jax.model.fetch``),
  # reading fictional biographies from the world (or the user's documents with
  # --config.data.source=jsonl --config.data.documents=FILE) through its chat template.
  c.model_source = "gguf"
  c.methods = ("base", "in_context", "sft", "opsd", "sleep")
  c.consolidation.lr_existing = 1e-5  # OPSD trains all 135M parameters
  c.seq_len = 256
  c.world_chunks = 1
  c.data.chunk_size = 4  # people (or documents) per wake chunk
  # A chat answer is a sentence: 12 new tokens cut it before the answer ("... designed by O");
  # 32 holds the sentence (make_known_facts.py uses the same budget).
  c.eval.max_new_tokens = 32
  c.eval.kl_new_tokens = 32
  c.eval.batch_size = 16
  c.eval.metric = "contains"  # a chat model answers in a sentence
  c.consolidation.steps = 16
  c.consolidation.batch_size = 4
  c.consolidation.max_new_tokens = 24
  c.consolidation.optimizer.lr = 3e-3  # the new slot (opsd: every parameter, see README)
  c.deep_every = 1000  # one fast level is enough for a single wake chunk
  c.dreaming.templates = {"qa": "{context}\n\nWrite three questions about this text, each "
                                "followed by its short answer."}
  c.dreaming.m = 6
  c.dreaming.k = 2
  c.dreaming.b = 1
  c.dreaming.rounds = 1
  c.dreaming.max_new_tokens = 48
  c.dreaming.inner_steps = 2
  # Dreams per vmap in scoring and trials: each holds a SmolLM2 backward pass (the GPU
  # variant writes 32 per round).
  c.dreaming.parallel_dreams = 8
  c.dream_training.steps = 8
  c.dream_training.batch_size = 4
  c.dream_training.optimizer.lr = 3e-3
  c.sft.steps = 15
  c.sft.batch_size = 4
  c.sft.optimizer.lr = 5e-5
  if variant == "smollm2_gpu":  # the GPU/TPU-sized run
    c.world_chunks = 5
    c.model_slots = 8  # 5 sleeps into the one fast level (the import has 4 slots per level)
    c.data.chunk_size = 20
    c.seeds = (0, 1, 2)
    c.methods = tuple(all_methods)
    c.consolidation.steps = 100
    c.consolidation.batch_size = 32
    c.consolidation.gamma = 0.5  # SmolLM2 is its own semantic judge
    c.dreaming.m = 32
    c.dreaming.rounds = 2
    # The values this variant had before the CPU smollm2 run was cut down (unchanged here).
    c.consolidation.optimizer.lr = 1e-3
    c.dreaming.k = 3
    c.dreaming.max_new_tokens = 64
    c.dreaming.inner_steps = 4
    c.dream_training.steps = 10
    c.dream_training.optimizer.lr = 1e-3
    c.sft.steps = 30
    c.sft.optimizer.lr = 1e-5
  if variant.startswith("smollm2_docs"):
    # The project's fictional-documents set (make_documents.py): 20 passages on CPU, all 48
    # in two chunks at GPU size. Every learning method gets the same steps x batch; the task's
    # train question wordings go to sft_questions and to the sleep's distillation prompts (the
    # eval wordings to no method). Consolidation with the recall variant's levers: off-policy
    # distillation of the in-context teacher (alpha 1, lam 0) plus CE on supported answers.
    c.data.source = "jsonl"
    c.data.documents = "experiments/knowledge_incorporation/documents_fictional.jsonl"
    c.data.max_documents, c.data.chunk_size = 20, 20
    c.methods = ("base", "in_context", "sft", "sft_questions", "opsd", "sleep_no_dream",
                 "sleep")
    k = c.consolidation
    k.lam, k.alpha, k.ce_weight = 0.0, 1.0, 1.0
    k.steps = c.sft.steps = 24
    k.batch_size = c.sft.batch_size = 8
    # A dream per passage a round (dream row i reads passage i mod 20): with the 6 of the
    # smollm2 variant, 14 of the 20 passages got no dream (validate.dream_coverage says so).
    c.dreaming.m = 20
    if variant == "smollm2_docs_gpu":
      c.data.max_documents, c.data.chunk_size = 0, 24
      c.seeds = (0, 1, 2)
      c.methods = ("base", "in_context", "sft", "sft_questions") + tuple(all_methods)[3:]
      k.steps = c.sft.steps = 300  # ~ 30 exposures per wake question
      k.batch_size = c.sft.batch_size = 32
      c.dreaming.m = 48  # two dreams per passage a round
    if variant.startswith("smollm2_docs_written"):
      _docs_written(c, gpu=variant.endswith("_gpu"))


def _docs_written(c: ml_collections.ConfigDict, gpu: bool) -> None:
  """``smollm2_docs`` with none of the task's questions given to any method, as the world's
  ``written``: consolidation distils the model's two rewrites of each passage (``REWRITES``,
  written by the model reading it, one greedy answer of up to 128 tokens each) plus the
  questions of Sleep's accepted dreams. A dream is written from the passage with one of its
  sentences read again (``focus``: the reader's answers to the 135M writer's questions then
  hold 33% of the passages' facts against 25%, README_smollm2.md) in the Q:/A: layout at T
  0.7; only questions naming the passage's entity count (the slots are keyed on it); a trial
  trains on the item the dream would become (``trial_view = "qa"``), judged on its passage's
  written questions (tau). Keyed slots; 240 steps x 8, as the 240-step run. ``gpu``: all 48
  passages in two sleeps of 24, 3 seeds, and the paper's Table 3 rows (SEAL, the dreaming
  ablations) beside the SFT controls, with the same steps and dreams per passage."""
  c.methods = ("base", "in_context", "sft", "sleep_no_dream", "sleep", "sft_items", "sft_selfgen")
  c.model_slot_keys, c.model_slot_key_len, k = 40, 8, c.consolidation
  k.steps = c.sft.steps = 240
  # "Tell me about <title>." says half of the facts or less, the rewrites 94-97%; one greedy
  # answer, as four samples at T 1 teach a blend (README_smollm2.md, 26th and 27th sessions).
  k.prompt_templates, k.ce_weight = REWRITES, 0.0
  k.max_new_tokens, k.teacher_samples, k.sample_top_k = 128, 1, 1
  d = c.dreaming
  d.templates, d.temperature, d.max_new_tokens, d.focus = {"qa": QA_LAYOUT}, 0.7, 80, "sentences"
  d.stage, d.tau_target, d.trial_view = "before", "written", "qa"
  d.qa_items, d.qa_named, d.sft_context, d.tau_scope, d.tau_samples = (True, True, "prompt",
                                                                       "passage", 2)
  # 2 dreams per (passage, sentence) prompt, 48 tried (a trial: 2 steps on one item, then tau)
  d.m, d.k, d.b = 128, 40, 8
  if gpu:
    c.data.max_documents, c.data.chunk_size, c.seeds = 0, 24, (0, 1, 2)
    c.methods = ("base", "in_context", "sft", "sft_items", "sft_selfgen", "opsd",
                 "sleep_no_dream", "sleep", "seal", "sleep_no_random_expert",
                 "sleep_no_grad_selection")
    d.m, d.k = 152, 48  # 24 passages a sleep: the 20-passage run's dreams per passage
    seal_at_sft_budget(c)


def seal_at_sft_budget(c: ml_collections.ConfigDict) -> None:
  """SEAL's accepted dreams train every parameter as SFT does: its optimizer, steps and batch
  (``epochs`` = steps, so no pass cap cuts the budget)."""
  c.dream_training = ml_collections.ConfigDict(dict(
      steps=c.sft.steps, epochs=c.sft.steps, batch_size=c.sft.batch_size,
      optimizer=ml_collections.ConfigDict(c.sft.optimizer.to_dict()), loss=c.sft.loss))
