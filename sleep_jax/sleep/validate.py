"""Checks of a sleep-cycle config and its inputs before any compute: every mistake found here is
a one-line ``UserError`` (method names, sizes, the documents file, the model file), and inputs
longer than the model's context are refused (or cut, when asked) before any model work.
``check`` imports no jax, so a mistyped config is refused in well under a second."""

from __future__ import annotations

import dataclasses
from typing import List

from sleep_jax import tasks
from sleep_jax.errors import UserError
from sleep_jax.sleep import consolidation_config
from sleep_jax.sleep import methods as methods_lib

POSITIVE = ("consolidation.steps", "consolidation.batch_size", "consolidation.max_new_tokens",
            "sft.steps", "sft.batch_size", "eval.batch_size", "eval.max_new_tokens",
            "dreaming.m", "dreaming.max_new_tokens", "dream_training.steps",
            "dream_training.batch_size", "seq_len")
CHOICES = {"eval.metric": ("em", "contains", "checked"), "eval.rows": ("all", "latest"),
           "on_config_change": ("error", "restart"), "model_source": ("world", "gguf"),
           "consolidation.replay_items": consolidation_config.REPLAY_ITEMS,
           "consolidation.anchor_people": ("qa", "everyone"),
           "dreaming.stage": ("after", "before"), "dreaming.tau_scope": ("all", "passage"),
           "dreaming.tau_target": ("self", "gold", "written"),
           "dreaming.trial_view": ("as_written", "closed_book", "qa"),
           "dreaming.focus": ("passage", "sentences")}


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def check(config) -> None:
  """Raises UserError on the first invalid setting of ``config``; cheap (no model work)."""
  c = config
  if not tuple(c.methods):
    raise UserError("config.methods is empty; name at least one method, e.g. "
                    "--config.methods='(\"base\",\"sleep\")'")
  for name in c.methods:
    methods_lib.get(str(name))
  if not tuple(c.seeds) or not all(isinstance(s, int) and s >= 0 for s in c.seeds):
    raise UserError(f"config.seeds={tuple(c.seeds)!r}: needs one or more integers >= 0, e.g. "
                    "--config.seeds='(0,1,2)'")
  for key in POSITIVE:
    v = _get(c, key)
    if not isinstance(v, int) or v <= 0:
      raise UserError(f"config.{key}={v!r} must be a positive integer")
  for key, valid in CHOICES.items():
    if _get(c, key) not in valid:
      raise UserError(f"config.{key}={_get(c, key)!r}; valid: {', '.join(valid)}")
  tasks.check_source(c.data.source)
  if float(c.consolidation.decoys) < 0:
    raise UserError(f"config.consolidation.decoys={c.consolidation.decoys} must be >= 0")
  if not 0.0 <= float(c.consolidation.anchor_share) < 1.0:
    raise UserError(f"config.consolidation.anchor_share={c.consolidation.anchor_share} must be "
                    "in [0, 1)")
  if c.consolidation.verify_teacher and tuple(c.consolidation.prompt_templates):
    raise UserError("config.consolidation.verify_teacher needs the task's questions and their "
                    "answers to check the teacher against; prompt_templates items have none")
  if c.data.source == "world" and int(c.world_chunks) < 1:
    raise UserError(f"config.world_chunks={c.world_chunks} must be >= 1")
  for key in ("data.chunk_size", "data.max_documents"):
    if int(_get(c, key)) < 0:
      raise UserError(f"config.{key}={_get(c, key)} must be >= 0 (0 = all)")
  if c.data.source == "jsonl":
    from sleep_jax.data import documents
    docs = documents.load_jsonl(c.data.documents)  # every line checked now, not after the model
    untitled = [d.id for d in docs[:int(c.data.max_documents) or None] if not d.title]
    if int(c.get("model_slot_keys", 0)) and untitled:
      raise UserError(f"{c.data.documents}: model_slot_keys > 0 keys each sleep's slots on its "
                      f"documents' titles, and document {untitled[0]!r} has none (add "
                      "\"title\": the name its questions use)")
  if c.model_source == "gguf":
    _check_gguf(c.gguf)


def _check_gguf(path: str) -> None:
  from sleep_jax.model import fetch
  if not path:
    try:
      path = fetch.smollm2_path()
    except FileNotFoundError as e:
      raise UserError(str(e)) from None
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
  except OSError as e:
    raise UserError(f"cannot read model file {path!r} ({e.strerror}); pass --config.gguf=FILE "
                    "or fetch SmolLM2 with `python -m sleep_jax.model.fetch`") from None
  if magic != b"GGUF":
    raise UserError(f"model file {path!r} is not a GGUF file (it starts with {magic!r}); "
                    "re-fetch it with `python -m sleep_jax.model.fetch`")


def bound_inputs(config, setup, log=print) -> None:
  """Every document's longest prompt (passage + question) plus the answer budget must fit in
  ``config.seq_len``; otherwise UserError naming the document, or with ``data.truncate`` its
  passage is cut to fit (a warning names it). Mutates ``setup.chunks`` only when cutting."""
  limit = int(config.seq_len)
  budget = max(int(config.eval.max_new_tokens), int(config.consolidation.max_new_tokens))
  fmt = setup.fmt

  def longest(passage: str, doc) -> int:
    qs = [q.q for q in (*doc.train_questions, *doc.eval_questions)] or [""]
    return max(len(fmt.with_context(passage, q)) for q in qs) + budget

  for ci, chunk in enumerate(setup.chunks):
    out: List = []
    for doc in chunk:
      n = longest(doc.passage, doc)
      if n > limit:
        if not config.data.truncate:
          raise UserError(f"document {doc.id!r}: passage + question + {budget} answer tokens = "
                          f"{n} tokens > seq_len {limit}; shorten or split it, raise "
                          "--config.seq_len, or pass --config.data.truncate=True to cut it")
        words = doc.passage.split()
        lo, hi = 0, len(words)  # the longest prefix of words that fits
        while lo < hi:
          mid = (lo + hi + 1) // 2
          if longest(" ".join(words[:mid]), doc) <= limit:
            lo = mid
          else:
            hi = mid - 1
        if lo == 0:
          raise UserError(f"document {doc.id!r}: even without its passage a question does not "
                          f"fit in seq_len {limit}")
        log(f"warning: document {doc.id!r} cut from {len(words)} to {lo} words to fit seq_len "
            f"{limit} (data.truncate=True)")
        doc = dataclasses.replace(doc, passage=" ".join(words[:lo]))
      out.append(doc)
    setup.chunks[ci] = out


def dream_coverage(config, setup, log=print) -> None:
  """A warning when a dreaming method writes fewer dreams a round than a chunk has dream
  prompts that read a passage: row i is written from prompt ``i mod P``
  (``dream_batches.prompt_batch``), so the passages after the first ``dreaming.m`` get none."""
  from sleep_jax.sleep import dream_qa  # here, not at the top: ``check`` imports no jax
  for name in config.methods:
    method = methods_lib.get(str(name))
    if method.dreaming is None:
      continue
    dcfg = methods_lib.dreaming_config(method, config.dreaming)
    if not dcfg.enabled or not any("{context}" in t for t in dcfg.templates.values()):
      continue  # prompts that read no passage are all alike: which ones get a dream is moot
    # One prompt per (document, template), every template counted: row i reads prompt i mod P.
    prompts = max(len(dream_qa.focused_documents(ch, dcfg.focus)[0]) for ch in setup.chunks)
    prompts *= len(dcfg.templates)
    if int(dcfg.m) < prompts:
      log(f"warning: {name}: dreaming.m={dcfg.m} dreams a round for {prompts} dream prompts "
          f"a chunk: prompts {int(dcfg.m) + 1}-{prompts} get no dream; pass "
          f"--config.dreaming.m={prompts} (or a multiple) to write about every passage")
      return


def slot_demand(schedule, slots: int, n_chunks: int, *, reset_between_chunks: bool = False,
                prune: bool = True) -> dict:
  """Slots each CMS level must hold at once: level l unlocks ``slots`` every ``C_l`` chunks
  and is pruned when level l+1 receives it (every ``C_{l+1}`` chunks; never for the slowest
  level, nor without ``prune``); a per-task reset starts every chunk from the base."""
  need = {}
  for level, every in enumerate(schedule):
    events = n_chunks // every
    if reset_between_chunks:
      events = min(events, 1)
    elif prune and level + 1 < len(schedule):
      events = min(events, schedule[level + 1] // every)
    need[level] = int(slots) * events
  return need


def slot_capacity(config, setup) -> None:
  """UserError, before any sleep, when a method's sleeps would unlock more slots in a CMS level
  than the model has before that level is pruned (``consolidation.slots`` x sleeps)."""
  have = int(setup.cfg.n_slots)
  for name in config.methods:
    method = methods_lib.get(str(name))
    if method.learn != "sleep" or method.consolidation is None:
      continue
    kcfg = methods_lib.consolidation_config(method, config.consolidation)
    if not kcfg.expand:
      continue
    sched = methods_lib.sleep_schedule(tuple(config.sleep_every) or (1, config.deep_every),
                                       method, setup.cfg.n_levels)
    need = slot_demand(sched, int(kcfg.slots), len(setup.chunks),
                       reset_between_chunks=bool(config.reset_between_chunks),
                       prune=bool(kcfg.prune))
    for level, n in need.items():
      if n > have:
        raise UserError(
            f"method {name!r} unlocks {kcfg.slots} slot(s) per sleep in CMS level {level}, "
            f"{n // int(kcfg.slots)} times before the level is pruned: {n} slots, but the model "
            f"has {have} per level; "
            + (f"pass --config.model_slots={n} or " if "model_slots" in config else "")
            + "lower --config.consolidation.slots")
