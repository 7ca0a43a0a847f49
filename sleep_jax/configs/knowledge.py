"""The built-in experiment: knowledge incorporation and continual learning on the synthetic world.

    python -m sleep_jax.main --config=sleep_jax/configs/knowledge.py --workdir=/tmp/run

Variants (``--config=...knowledge.py:VARIANT``):

* ``default``  the README's main job: every main method and ``sft_selfgen``, one seed, on the
               shipped base that recalls its own facts; no method gets the task's questions
               (Sleep's dreams are its study questions), and each sleep's slots are keyed on
               its chunk's names (model/slot_keys.py); about 8 minutes on 2 CPU cores;
* ``questions`` the main job before the twentieth session: the task's training questions go to
               every method, slots routed by a trained gate with anchors and replay;
* ``written``  ``questions`` with none of the task's questions given to any method: consolidation
               distils one item per passage and Sleep's dreams are the study questions;
* ``base_r``   the first wave's main job: the shipped base R (which never learnt closed-book
               recall) and one slot per sleep; ``full``, ``continued`` and ``continual`` use it;
* ``full``     ``experiments/knowledge_incorporation``: every method and ablation, 3 seeds, the
               continual variant's 5 chunks (the same workdir can hold both);
* ``continued`` the many-passage ("continued pretraining") regime: each new person arrives as 4
               paraphrased passages (``data.passages_per_person``);
* ``continual`` ``experiments/continual``: more chunks, retention and accuracy matrices;
* ``table3_levels`` the main job on the base with 4 CMS levels: Sleep over 1, 2 and 4 of them;
* ``table3_continued`` ``table3``'s rows with 4 paraphrased passages per new person;
* ``smollm2``  the real SmolLM2-135M-Instruct (GGUF) on a few fictional passages or on the
               user's documents (``--config.data.source=jsonl --config.data.documents=FILE``);
* ``smollm2_gpu`` the same at GPU/TPU size (every method, 3 seeds);
* ``smollm2_docs`` SmolLM2 on the project's fictional-documents set (20 passages, every main
               method, CPU-sized); ``smollm2_docs_gpu``: all 48 passages, 3 seeds, GPU-sized;
               ``smollm2_docs_written``: the same 20 passages with none of the task's questions
               given to any method (the model's rewrites and its dreams are the study
               material), keyed slots; ``smollm2_docs_written_gpu``: all 48, 3 seeds, Table 3
               rows (the SmolLM2 variants are set in knowledge_smollm2.py);
* ``test``     seconds-long, for the unit tests.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from sleep_jax.configs import knowledge_smollm2 as smollm2
from sleep_jax.sleep import consolidation_config, dreaming_config
from sleep_jax.tasks import pretrain_recipe

HELP = {
    "default": "the README's main job: written dreams, keyed slots, every main method (~8 min)",
    "questions": "the main job before: the task's questions to every method, a trained gate",
    "base_r": "the first wave's main job: base R, one slot per sleep (~4 min)",
    "full": "every method and ablation, 3 seeds, 5 chunks",
    "continued": "the many-passage regime: 4 paraphrased passages per new person",
    "continual": "the continual-learning stream: 5 chunks, 3 seeds, accuracy matrices",
    "recall": "a base that recalls its own facts, with the storage levers (~8 min)",
    "capacity": "recall with 8 slots per sleep, hidden-layer gate, replay, one fast level; 3 seeds",
    "written": "the main job with none of the task's questions: dreams are the study questions",
    "written_sticky": "written, dreams in every wording (entity copying) and sticky slot gates: "
                      "stores more, keeps fewer old facts",
    "table3": "the main job's settings with the paper's Table 3 rows: SEAL and the dreaming "
              "ablations beside Sleep, 3 seeds (~40 min)",
    "table3_levels": "the main job with 4 CMS levels: Sleep over 1, 2 and 4 levels, 3 seeds",
    "table3_continued": "table3's rows in the many-passage regime: 4 paraphrased passages per "
                        "new person, 3 seeds",
    "smollm2": "the real SmolLM2-135M-Instruct on a few world people or your documents",
    "smollm2_gpu": "the same at GPU/TPU size (every method, 3 seeds)",
    "smollm2_docs": "SmolLM2 on the project's fictional-documents set (20 passages, CPU, ~1.5 h)",
    "smollm2_docs_gpu": "the same on all 48 passages, 3 seeds, GPU-sized",
    "smollm2_docs_written": "smollm2_docs with no task questions: the model's rewrites and its "
                            "dreams are the study material",
    "smollm2_docs_written_gpu": "the same on all 48 passages in 2 sleeps, 3 seeds, the Table 3 "
                                "rows (GPU-sized)",
    "test": "seconds-long, for the unit tests",
}
# The variants with the main job's settings.
_MAIN = ("default", "table3", "table3_levels", "table3_continued")
MAIN_METHODS = ("base", "in_context", "sft", "opsd", "sleep_no_dream", "sleep")
ALL_METHODS = MAIN_METHODS + ("sft_selfgen", "sleep_no_imitation", "sleep_no_semantic",
                              "sleep_no_expansion", "sleep_no_random_expert",
                              "sleep_no_grad_selection")


def _base_recipe(recipe: pretrain_recipe.PretrainConfig) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(json.dumps(dataclasses.asdict(recipe))))


def _optimizer(lr: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name="adam", lr=lr, b1=0.9, b2=0.95, grad_clip=1.0))



def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "sleep_cycle"
  c.distributed = "off"
  # The device mesh the whole cycle runs on (as the LM job's): -1 = every device left. Parameters
  # and optimizer state are placed by the logical-axis rules (parallel/mesh.py).
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Tuples, so that the command line can pick them: --config.methods='("base","sleep")'
  c.seeds = (0,)
  c.methods = tuple(MAIN_METHODS)
  # A run directory recorded with another (result-relevant) config: "error" stops naming the
  # keys, "restart" discards that run and starts it again (sleep/run_records.py).
  c.on_config_change = "error"
  c.model_source = "world"  # "world": the cached tiny base model | "gguf": an imported checkpoint
  c.gguf = ""  # model_source="gguf": path ("" = the fetched SmolLM2)
  c.model_remat = ""  # "none" | "dots" | "full" per layer ("": the model's own); memory only
  c.data = ml_collections.ConfigDict(dict(
      source="world",  # "world" | "jsonl"
      documents="",  # source="jsonl": the user's documents file
      chunk_size=0,  # documents per wake chunk (0 = all people of a world chunk / all documents)
      max_documents=0,  # source="jsonl": the first n documents of the file (0 = all)
      # A passage + question longer than seq_len is an error; True cuts the passage to fit
      # (with a warning naming the document).
      truncate=False,
      # world: 1 = single-passage regime; n > 1 = the many-passage ("continued pretraining")
      # regime, each new person arrives as n paraphrased passages (variant ``continued``)
      passages_per_person=1,
  ))
  c.base_cache = ""  # "" = WORKDIR/base
  # Pre-allocated low-rank slots per CMS level (0 = the base's own; more are added masked, which
  # leaves the base's function unchanged): capacity for consolidation.slots > 1 over a stream.
  c.model_slots = 0
  # Hidden units of each slot's gate (0 = the linear gate sigmoid(w . x)); added to a loaded base
  # with a silent hidden layer (growth.add_slot_gates), so the base's function is unchanged.
  c.model_gate_hidden = 0
  c.model_gate_sticky = False  # slot gates that stay open after the token they opened on
  # Entity-keyed slots (model/slot_keys.py): each slot holds up to model_slot_keys names of
  # model_slot_key_len tokens (a sleep writes its chunk's document titles) and is on only for
  # inputs that name one. 0 = off.
  c.model_slot_keys = 0
  c.model_slot_key_len = 0
  c.base = _base_recipe(pretrain_recipe.PretrainConfig())
  c.seq_len = c.base.seq_len
  c.world_chunks = 3  # T wake chunks used (<= base.world.n_chunks)

  # Sleep: consolidation into the fast level every chunk; deep sleep into the slow level.
  k = consolidation_config.default_config()
  k.steps = 60
  k.batch_size = 16
  k.optimizer = _optimizer(1e-2)  # the new slot
  k.lr_existing = 1e-3  # OPSD / no-expansion: every parameter (the SFT baseline's lr)
  k.divergence = "fkl"
  k.max_new_tokens = 2  # one-token answers + eos
  k.teacher_samples = 2
  k.gamma = 0.0  # the tiny model is no judge; "sleep_no_semantic" is then the same method
  c.consolidation = k
  c.deep_every = 2
  # (C_0, C_1, ...) of CMS levels 0, 1, ... in chunks; () = (1, deep_every): two levels.
  c.sleep_every = ()
  c.deep_lam = 0.0
  # Per-task protocol (ARC): every chunk starts from the model as it was before the stream.
  c.reset_between_chunks = False
  # Dream-generator training before the stream: passes over the task's generator documents.
  c.generator_training = ml_collections.ConfigDict(dict(epochs=0))

  d = dreaming_config.default_config()
  d.rounds = 2
  d.m = 16
  d.max_new_tokens = 12
  d.k = 6
  d.b = 2
  d.sft_context = "none"
  d.inner_steps = 4
  d.inner_lr = 1e-2
  d.templates = {"continue": "{context}"}
  c.dreaming = d
  c.dream_training = ml_collections.ConfigDict(dict(steps=20, epochs=2, batch_size=8,
                                                    optimizer=_optimizer(1e-3), loss="lm"))

  # loss: a registered loss name (``losses/``); variants: TTT's task variants per task.
  c.sft = ml_collections.ConfigDict(dict(steps=60, batch_size=16, optimizer=_optimizer(1e-3),
                                         loss="lm", variants=0))
  # metric: "em" | "contains"; rows: "all" (R[t, j] for every chunk j after chunk t) | "latest"
  # (only R[t, t]: enough for a per-task protocol with reset_between_chunks, T times cheaper).
  # in_context: every method is scored with the passage in the prompt (ARC: SEAL's protocol).
  # kl_prompts generic prompts (the world: biography openings; a real model: the shipped
  # assets/probes/generic_prompts.txt), each with the base's kl_new_tokens greedy continuation,
  # give ``kl_to_base`` (eval/kl_probe.py); known_facts: a real model's known-facts file
  # ("" = the shipped one of the fetched SmolLM2, "none" = off).
  c.eval = ml_collections.ConfigDict(dict(retention_people=50, max_new_tokens=2, batch_size=64,
                                          metric="em", rows="all", in_context=False,
                                          kl_prompts=50, kl_new_tokens=16, known_facts=""))

  if variant == "base_r":
    pass
  elif variant == "full":
    # The continual variant's stream (5 chunks) with every method: one workdir holds both.
    c.methods = tuple(ALL_METHODS)
    c.seeds = (0, 1, 2)
    c.world_chunks = 5
  elif variant == "continued":
    # The many-passage regime: every new person arrives as 4 paraphrased passages.
    c.data.passages_per_person = 4
  elif variant == "continual":
    c.methods = ("base", "in_context", "sft", "opsd", "sleep_no_dream", "sleep")
    c.seeds = (0, 1, 2)
    c.world_chunks = 5
    c.deep_every = 2
  elif variant in ("recall", "capacity", "questions", "written", "written_sticky") + _MAIN:
    # A base that recalls its own QA population closed-book (``pretrain_recipe.recall_recipe``,
    # shipped) and the storage levers (experiments/knowledge_incorporation/README.md, tenth
    # session): off-policy distillation of the in-context teacher plus cross-entropy on the
    # supported answers, 8x the steps (tens of exposures per fact), anchor prompts distilled from
    # the waking model. SFT and OPSD get the same steps.
    c.base = _base_recipe(pretrain_recipe.recall_recipe())
    c.methods = ("base", "in_context", "sft", "sft_questions", "sleep_no_dream")
    k = c.consolidation
    k.steps, k.lam, k.alpha, k.ce_weight, k.anchor_prompts = 480, 0.0, 1.0, 1.0, 360
    c.sft.steps = 480
    if variant in ("capacity", "questions", "written", "written_sticky") + _MAIN:
      # The fourteenth session's levers: capacity (8 slots x rank 16 per sleep, 3x the storage
      # of one slot), the gate, replay of the earlier chunks' passages, and one fast level (the
      # deep sleep into level 1 lost a third of what the fast level held at this step budget);
      # the fifteenth's: a gate with a hidden layer that tells new people from known ones, shut
      # over every position of an anchor, and twice the anchors (every known person but the
      # probe's): a stream that keeps what it stored and the base's reading skill.
      c.methods = ("base", "in_context", "sft", "sft_questions", "sleep_no_dream", "sleep")
      c.seeds = (0, 1, 2)
      c.model_slots, k.slots, k.gate_weight, k.replay_fraction = 24, 8, 20.0, 1.0
      c.model_gate_hidden, k.gate_positions, k.anchor_prompts = 32, "anchor_all", 700
      c.deep_every = 1000
    if variant in ("questions", "written", "written_sticky") + _MAIN:
      # 2 chunks: the six methods in ~10 min on 2 cores
      c.methods, c.seeds, c.world_chunks = tuple(MAIN_METHODS), (0,), 2
      # The two sleeps' slots and a smaller gate: masked slots and the gate's hidden layer are
      # computed on every token (experiments/knowledge_incorporation/README.md, fifteenth session).
      c.model_slots, c.model_gate_hidden = 16, 16
    if variant in ("written", "written_sticky") + _MAIN:
      # None of the task's questions reach any method: every learner gets the passages only.
      # Consolidation distils one item per document, "<passage> Q: <name>" -> "Q: <name>"
      # (the teacher writes its own question and answer); Sleep's dreams are questions the
      # model writes about the passage, tried closed-book against questions it wrote itself
      # (tau), and the accepted ones join consolidation's items in the same steps.
      k.prompt_templates, k.ce_weight, k.teacher_samples = ("{context} Q: {title}",), 0.0, 4
      d = c.dreaming
      d.templates = {"question": "{context} Q: {title}"}
      d.stage, d.tau_target, d.trial_view, d.qa_items = "before", "written", "closed_book", True
      d.sft_context = "prompt"
      # 12 dreams per passage and round, every one tried (the top-k cut kept the few facts the
      # model likes to ask about: 29% of the facts covered against 56%, README sixteenth
      # session), tau over 12 written questions per passage (a trial can only show a gain on a
      # fact tau asks about); fewer anchors than the question-fed main job's 700, which would
      # outnumber the ~250 new items.
      d.m, d.k, d.b, d.tau_samples, k.anchor_prompts = 240, 192, 48, 12, 300
      # Each trial judged on its own passage's tau questions (scored on all of tau, the gain
      # of one dream was lost in the noise of the others: 23.9% stored against 38.5%).
      d.tau_scope = "passage"
      # Replay brings the earlier chunks' accepted dream questions (kept in the episodic
      # memory) as anchors: the new slot stays shut on the people earlier sleeps stored. Their
      # own "Q: <name>" items, which store nothing, cost the first chunk 18 points (README,
      # seventeenth session).
      k.replay_items = "dreams_kept"
      c.methods = MAIN_METHODS + ("sft_selfgen",)
    if variant == "written_sticky":
      # The model words its questions freely and the sampler writes the passage's person where
      # it first names someone (the "{title}" template allows one wording per attribute, and
      # "The birth year of X is what?" was stored at 21% against 57% for "X was born in which
      # year?"); a slot gate that opened on the name stays open after it. One sleep, seed 0:
      # 38.7 -> 47.1 stored, old facts 38.0 -> 26.5 (README, eighteenth session).
      c.dreaming.templates = {"question": "{context} Q:"}
      c.dreaming.copy_title, c.model_gate_sticky = True, True
    if variant in _MAIN:
      # Each sleep keys its slots on its chunk's names (a world name is 2 tokens; 24 >= the 20
      # people of a chunk): every prompt about anyone else gets the model without them, so the
      # anchors and the replay that taught a trained gate "not this one" have nothing left to
      # do; Sleep gives their rows to the new items (phases.consolidate), OPSD keeps them.
      # Dreams name the passage's person in every wording (entity copying). One sleep, seed 0
      # (README, twentieth session): stored 38.7 -> 43.3 (keys) -> 49.6 (no anchor rows) ->
      # 57.9 (copied dreams); old facts 38.0 -> 51.0.
      c.model_slot_keys, c.model_slot_key_len = 24, 2
      c.dreaming.templates = {"question": "{context} Q:"}
      c.dreaming.copy_title = True
    if variant in ("table3", "table3_continued"):
      # SEAL studies its accepted dreams (ReST-EM on the same dreams as Sleep) in every
      # parameter at SFT's learning rate, steps and batch: the same budget as every learner.
      c.methods = ("base", "in_context", "sft", "seal", "sleep_no_dream", "sleep",
                   "sleep_no_random_expert", "sleep_no_grad_selection")
      c.seeds = (0, 1, 2)
      smollm2.seal_at_sft_budget(c)
    if variant == "table3_continued":
      # The many-passage ("continued pretraining") regime: each new person arrives as 4
      # paraphrased passages (80 documents a chunk), at the single-passage budget: the same
      # steps, dreams per round and trials, so each passage gets a quarter of them.
      c.data.passages_per_person = 4
      # 60 trials at a time: 240 at once asked for 26 GB when every trial still ran over all
      # 960 tau questions (a batching key: no result changes; its timings were taken so).
      c.dreaming.parallel_dreams = 60
      c.methods = ("base", "in_context", "sft", "seal", "sleep_no_dream", "sleep")
    if variant == "table3_levels":
      # Sleep over 1, 2 and 4 CMS levels on the same model: two empty slots-only levels go in
      # before the MLP level (growth.add_levels), and every sleep cascades its fast level down
      # the levels in use (sleep_every = 1 each: level l receives level l-1 after every chunk,
      # which is then pruned), so a chunk's knowledge ends in the slowest level in use.
      # ``model_levels``: the model's CMS levels (only this variant sets the key, so that the
      # runs recorded before it existed still resume; models.load reads 0 = the base's own).
      c.model_levels, c.sleep_every = 4, (1, 1, 1, 1)
      c.methods = ("base", "in_context", "sleep_1_level", "sleep_2_levels", "sleep_4_levels")
      c.seeds = (0, 1, 2)
  elif variant in smollm2.VARIANTS:
    smollm2.apply(c, variant, ALL_METHODS)
  elif variant == "test":
    c.mesh.data = 1  # one device: the unit tests' 8 fake devices would only slow them
    c.base = _base_recipe(pretrain_recipe.runlocal())
    c.seq_len = c.base.seq_len
    c.world_chunks = 2
    c.consolidation.steps = 3
    c.consolidation.batch_size = 4
    c.dreaming.m = 4
    c.dreaming.rounds = 1
    c.dreaming.k = 2
    c.dreaming.b = 1
    c.dreaming.max_new_tokens = 4
    c.dreaming.inner_steps = 1
    c.dreaming.margin = -1e9  # accept every kept dream: exercises dream training
    c.dream_training.steps = 2
    c.dream_training.batch_size = 2
    c.sft.steps = 2
    c.sft.batch_size = 2
    c.eval.retention_people = 5
  else:
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(HELP)}")
  return c
