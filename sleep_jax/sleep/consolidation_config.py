"""Every knob of one consolidation event (``consolidation.py``): ``config.consolidation``."""

from __future__ import annotations

import ml_collections

# What a replayed document brings to a sleep (``replay_items`` below).
REPLAY_ITEMS = ("passages", "passages_kept", "dreams", "dreams_kept")


def default_config() -> ml_collections.ConfigDict:
  """Every knob of one consolidation event. Paper values (App. B): lr 5e-6, batch 32, 100 steps."""
  c = ml_collections.ConfigDict()
  c.enabled = True
  c.steps = 100
  c.batch_size = 32
  c.optimizer = ml_collections.ConfigDict(dict(name="adam", lr=5e-6, b1=0.9, b2=0.95,
                                                grad_clip=1.0))
  c.source_level = -1  # -1: the context (memory level 0); j >= 0: CMS level j
  c.target_level = 0  # CMS level that receives the new slot
  c.expand = True  # False: "no expansion" ablation, train the existing parameters instead
  c.slots = 1  # slots unlocked (and trained together) per consolidation: capacity = slots x rank
  c.lr_existing = 1e-5  # learning rate when existing parameters train (expand=False)
  c.prune = True  # reset the source level's slots afterwards
  # The objective (a registered loss, ``losses/objectives.py``) and its divergence (registered,
  # ``losses/divergences.py``): any registered name plugs in.
  c.objective = "knowledge_seeding"
  c.lam = 0.5  # GKD: fraction of the divergence term on student samples
  c.divergence = "jsd"
  c.divergence_kwargs = ml_collections.ConfigDict()  # e.g. {"beta": 0.5} for jsd
  c.temperature = 1.0  # of the divergence
  c.alpha = 0.8  # KS: weight of the divergence; 1 - alpha weighs the imitation reward
  c.gamma = 0.5  # LTI: weight of the semantic reward (0: "no semantic reward")
  c.z0 = 0.0  # LTI: r_abs = 0 when lev > z0 (0 or less: no threshold)
  c.advantage = "reinforce"
  c.teacher_samples = 4  # samples per prompt in the teacher dataset D
  c.max_new_tokens = 16
  c.sample_temperature = 1.0
  # Top-k of every consolidation sample, the teacher dataset's and the student's (0: the full
  # distribution; 1 with teacher_samples 1: one greedy teacher answer per item, which
  # SmolLM2's slot stores better than four samples at T 1, README_smollm2.md)
  c.sample_top_k = 0
  # Replay: earlier chunks' documents (fast consolidation) or episodic-memory items (deep sleep)
  # mixed into each sleep, this fraction of the new ones.
  c.replay_fraction = 0.0
  # What a replayed document brings (``phases.consolidate``): "passages" its own items, taught
  # again from the passage; "passages_kept" those as anchors (the model as it woke up answers
  # them, the new slot's gate shut); "dreams" its accepted dreams' questions, taught again;
  # "dreams_kept" those as anchors.
  c.replay_items = "passages"  # one of REPLAY_ITEMS
  # beta: weight of the student's cross-entropy on answers the source supports (a document's
  # gold answer to each wake question; 0: pure distillation, capped by the teacher's errors).
  c.ce_weight = 0.0
  # True: the teacher is trusted only on items where one of its samples checks out against the
  # supported answer (``eval.metric``); elsewhere only the ce_weight term teaches
  # (``teacher_trust.py``).
  c.verify_teacher = False
  # Anchor prompts (``Setup.anchor_prompts``) mixed into the items: the student matches the model
  # as it woke up on them (same prompt both sides), so unrelated behaviour stays the base's.
  c.anchor_prompts = 0
  c.anchor_closed_book = 0.5  # world: the closed-book share of them (the rest: reading)
  # Whose closed-book anchors (world): "qa" the known people after the probe's; "everyone"
  # also people the base never answered about (pretraining and reading populations).
  c.anchor_people = "qa"
  # > 0: this share of each batch's rows are anchors, whatever the number of anchor items
  # (0: items drawn uniformly, anchors as many times as their number says).
  c.anchor_share = 0.0
  c.value_anchors = 0  # more anchors: known people whose answer is a value of the new chunk
  # Decoy anchors per accepted dream question (Sleep with dreams written before consolidation):
  # the question about a name mixed from two of the chunk's people, gate shut on it.
  c.decoys = 0.0
  c.gate_weight = 0.0  # eta of ``objectives.gate_loss``: the new slot opens on new items only
  # Where the gate term acts: "answer" (the positions that predict an answer) or "anchor_all"
  # (also every position of an anchor item: shut over the whole unrelated input).
  c.gate_positions = "answer"
  # () = the items are the task's wake questions; dream-style templates (``"{context} Q:
  # {title}"``) = one item per (template, document) and none of the task's questions (the
  # teacher writes its own question and answer, or rewrite, about the document's entity;
  # ``tasks.base.template_items``).
  c.prompt_templates = ()
  return c
