"""Every dreaming knob (``dreaming.py``): ``config.dreaming``. Kept apart from the loop so that
a config file, and the check of a config, import no jax."""

from __future__ import annotations

import ml_collections

from sleep_jax.model.config import LORA_TARGETS

# Dream prompt templates, name -> "...{context}..." (``dream_batches.DreamTemplates``).
DEFAULT_TEMPLATES = {
    "implications": "{context}\nImplications of this passage:\n",
    "qa": "{context}\nQuestions and answers about this passage:\n",
    "rewrite": "{context}\nThe same passage in other words:\n",
    "variant": "{context}\nA new task like this one:\n",
}


def default_config() -> ml_collections.ConfigDict:
  """Every dreaming knob. Ablations are values: ``score="random"`` (no gradient selection),
  ``random_expert=False`` (no random expert), ``enabled=False`` (no dreaming); the method table
  (``methods.METHODS``) applies them."""
  c = ml_collections.ConfigDict()
  c.enabled = True  # False: "Sleep without dreaming"
  # Knowledge tasks with a question-writing template (``dream_qa.py``): True consolidates the
  # (question, answer) pairs parsed from the accepted dreams, each question answered by the
  # model reading the passage, instead of the raw dream text.
  c.qa_items = False
  # Only the pairs whose question names the passage's entity (``Document.title``) in full: a
  # keyed slot (model/slot_keys.py) opens on the whole name, so no other question can reach it.
  c.qa_named = False
  # Sleep's student prompt for an accepted dream: "bos" (writes it from nothing) or "template"
  # (the dream's template without the passage, e.g. "Q: {title}": the query format).
  c.student_prompt = "bos"
  c.rounds = 2  # sample -> score -> select -> trials -> reward -> ReST-EM rounds per sleep
  # Sampling (step 1).
  c.m = 16  # dreams sampled per round (prompts are tiled over the m rows)
  c.max_new_tokens = 32
  c.temperature = 1.0
  c.top_k = 0
  c.top_p = 1.0
  c.random_expert = True  # every router also activates one random extra expert while dreaming
  c.templates = dict(DEFAULT_TEMPLATES)  # name -> "...{context}..." (used by DreamTemplates)
  # Entity copying (a template that ends in a question's opening without ``{title}``, e.g.
  # "{context} Q:"): the model words the question its own way and, where it first writes a
  # name, the sampler writes the passage's entity (``Setup.entity_starts``; the world).
  c.copy_title = False
  # Scoring and selection (steps 2-3).
  c.score = "grad_norm"  # grad_norm | grad_align | random
  c.k = 4  # top-k by score
  c.b = 2  # plus b distinct random others
  # SFT context of a dream in scoring and trials: "prompt" = completion given its prompt;
  # "none" = the completion alone as standalone text (SEAL-style closed-book self-edit).
  c.sft_context = "prompt"
  # How scoring and the trials read a dream: "as_written" (with its prompt, the passage) or
  # "closed_book" (the passage hidden: bos + the template's question opening + the dream, the
  # format it is consolidated and asked in; needs a ``{title}`` template, world documents);
  # "qa" (question-writing templates: the dream's first question asked closed-book with the
  # answer of the model reading the passage, the item it would be consolidated as).
  c.trial_view = "as_written"
  # Isolated trials (step 4): one fresh LoRA per round, copied per kept dream.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = LORA_TARGETS
  c.inner_steps = 4
  c.inner_lr = 1e-3
  c.inner_optimizer = "adam"  # sgd | adam
  # Dreams whose gradient scores / trials run in one vmap (0 = all): bounds memory on real models.
  c.parallel_dreams = 0
  # Reward (step 5).
  c.margin = 0.0  # r_i = 1[tau(adapted_i) > tau(base) + margin]
  # "all": a trial is scored on all of tau; "passage": on tau's questions about the dream's own
  # passage (SEAL's protocol: a self-edit is judged on its passage's questions).
  c.tau_scope = "all"
  # tau's targets in the cycle driver: "self" = the in-context model's own answers to the wake
  # (train) questions (label-free); "gold" = their known answers (ARC's leave-one-out
  # demonstrations, whose outputs are part of the context C, not the held-out test).
  # "written" = no task questions at all: questions the waking model writes about each passage
  # with the first template (``tau_samples`` per passage), answered by the model reading it.
  c.tau_target = "self"
  c.tau_samples = 4
  # "after": dreaming follows consolidation and the accepted dreams train the new slot for
  # ``dream_training`` steps; "before": dreaming comes first and the accepted dreams' questions
  # join consolidation's items (the same steps; ``dream_phase.consolidate``).
  c.stage = "after"
  # What a dream is written from (``dream_qa.focused_documents``): "passage" (each document) or
  # "sentences" (the passage with one of its sentences read again last, one per sentence).
  c.focus = "passage"
  # Task-variant candidate dreams per task and round (tasks that have variants, e.g. ARC).
  c.variants = 0
  # Dream simulation (``dream_sim.py``; tasks with checkable environments, e.g. arithmetic):
  # the model writes ``simulate_envs`` environments per sleep, the checker drops those it
  # cannot run, the model attempts each valid one ``simulate`` times, and the verified
  # trajectories compete with the other dreams in selection and the trials. 0: off.
  c.simulate = 0
  # False: a dream the model wrote itself is never accepted (it is still scored, tried and
  # taught to the generator as before); only offered candidates (dream simulation's verified
  # trajectories) reach consolidation. The ablation that tells which accepted dreams matter.
  c.accept_own = True
  c.simulate_envs = 32
  c.simulate_tokens = 96  # most tokens of one environment (problem + program)
  # ReST-EM on the dream generator (step 6): a generator LoRA that persists across rounds.
  c.rest_em = ml_collections.ConfigDict()
  c.rest_em.steps = 4
  c.rest_em.lr = 1e-3
  c.rest_em.optimizer = "adam"  # sgd | adam
  c.rest_em.rank = 8
  c.rest_em.alpha = 16.0
  c.rest_em.targets = ("q", "v")
  return c
