"""The base-model recipe: pretrain a tiny CMS transformer on the synthetic world, cache it.

What the base model learns (DESIGN.md section 5, the world in ``data/world.py``):

* to *read* biographies of the ``pretrain`` population (language-model loss on the passage);
* closed-book QA on the disjoint ``qa`` population (it memorises their facts from the answers);
* in-context QA on the disjoint ``reading`` population (many people, each seen a few times, so
  answers must be read, not recalled), as *multi-question* examples
  ``<passage> Q: q1 A: a1 Q: q2 A: a2 ...`` (all six attributes in random order, loss on the
  answers + final eos; component ``incontext_multi``). The first question is exactly the eval
  format ``<passage> Q: ... A:`` -> answer, and every passage supervises all attributes at once:
  with one question per passage the model learnt to read one attribute at a time (city first)
  and plateaued at ~20% for 1000+ steps (experiments/knowledge_incorporation/NOTES_world.md);
* to *write* questions about a passage (``incontext_generate``: ``<passage>`` ->
  ``Q: <question> A: <answer>`` + eos, loss on all of it), the format of the cycle's dreams
  (sampled from ``bos + passage``). The eos closing a biography is not trained by default
  (``bio_eos_weight=0``), so a passage is always continued by a question.
  ``dream_quality`` measures the fraction of sampled dreams that are well-formed and correct.

No question is ever asked about a ``pretrain`` person, so the model never learns to turn a read
biography into an answer -- the gap that dreaming and consolidation are meant to close. Training
stops once in-context exact match on never-seen ``heldout`` people with held-out question
templates reaches ``target_incontext`` (checked every ``eval_every`` steps) or at ``max_steps``.
Losses are answer-only for QA (the prompt is context, not target) and per-example normalised, so
a two-token QA target weighs as much as a 40-token biography.

``pretrain_or_load(cache_dir, recipe)`` trains once and caches params + tokenizer + configs +
metrics in ``cache_dir``; a later call with the same recipe loads them bit-identically.

The update step is ``sleep_jax.parallel.state.make_train_step`` (single device, no mesh).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax.data import world as world_lib
from sleep_jax.data.tokenizer import WordTokenizer
from sleep_jax.eval import qa as qa_eval
from sleep_jax.model import config as config_lib
from sleep_jax.model import transformer
from sleep_jax.model.config import ModelConfig
from sleep_jax.losses.lm import lm_loss
from sleep_jax.parallel import state as state_lib

def _print(msg: str) -> None:
  print(msg, flush=True)


# Biographies (pretrain people), closed-book QA (qa people), multi-question reading and question
# generation (reading people); see ``World.sample_train_example``. The single-question
# ``incontext`` component is redundant: a multi-question example starts with one. Reading gets
# the largest share: the skill the cycle's teacher needs (NOTES_world.md, fourth session).
DEFAULT_MIXTURE = (("bio", 0.15), ("closed", 0.15), ("incontext_multi", 0.6),
                   ("incontext_generate", 0.1))


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """The whole base-model recipe (the cache key)."""

  world: world_lib.WorldConfig = world_lib.WorldConfig()
  # Model (ModelConfig fields; vocab_size comes from the world's tokenizer).
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 8  # 8 x 16-dim heads read faster than 4 x 32 (NOTES_world.md)
  n_kv_heads: int = 4
  head_dim: int = 0  # 0: d_model // n_heads
  # RMSNorm on q and k per head (a learned per-dimension scale): 63.6% in context vs 43.8%
  # without, same recipe otherwise (runs Q / G in NOTES_world.md): the failing attributes were
  # copied in short passages but lost to distractors in full ones, i.e. attention too flat.
  qk_norm: bool = True
  d_ff: Tuple[int, ...] = (0, 256)
  n_experts: Tuple[int, ...] = (1, 1)
  chunk_sizes: Tuple[int, ...] = (1, 1)
  n_slots: int = 4
  slot_rank: int = 16
  seq_len: int = 64  # evaluation / cycle sequence length
  train_seq_len: int = 128  # longest pretraining row (multi-question examples); batches are
  # padded to the longest example rounded up to 16 tokens
  # Multi-question reading examples (mixture component ``incontext_multi``, see world.py).
  multi_min_questions: int = 6
  multi_max_questions: int = 6
  # Passage sentences kept in a multi-question example, (min, max) of world.N_SENTENCES (= 5:
  # full passages). Fewer sentences = fewer distractor values to choose from; with 1-5 the model
  # learns to copy more attributes (NOTES_world.md, fourth session).
  multi_min_sentences: int = 1
  multi_max_sentences: int = world_lib.N_SENTENCES
  # Reading curriculum: over the first ``sentence_curriculum_steps`` steps the most sentences a
  # multi-question passage keeps grows linearly from multi_min_sentences to multi_max_sentences
  # (0: no curriculum). A value token is easier to find among few (NOTES_world.md, 4th session).
  sentence_curriculum_steps: int = 0
  question_weight: float = 0.0  # loss weight of the question text in incontext_multi
  first_q_weight: float = -1.0  # weight of the "Q:" opening it (< 0: question_weight)
  bio_eos_weight: float = 0.0  # loss weight of the eos closing a biography (0: after a passage
  # only incontext_generate's "Q:" is trained, so dreams from "bos + passage" start a question)
  # Optimisation.
  seed: int = 0
  batch_size: int = 32  # x ~110-token multi-question rows: ~ the tokens of 64 x 64
  lr: float = 1e-2
  warmup_steps: int = 50
  final_lr_fraction: float = 0.1  # cosine decay to this fraction of lr (1.0: constant after warmup)
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  max_steps: int = 3000  # the default recipe reaches target_incontext at step 1600 and stops
  mixture: Tuple[Tuple[str, float], ...] = DEFAULT_MIXTURE
  # Stopping rule: in-context EM on heldout people, eval templates.
  eval_every: int = 100
  eval_people: int = 100  # heldout people used for the periodic check (x 6 attributes x 2)
  target_incontext: float = 0.9
  # What the model reads: "world" (``world`` above) | "streams" (long-horizon streams,
  # ``data.long_horizon.StreamCorpus``; its own mixture components, ``world`` unused).
  corpus: str = "world"

  def model_config(self, vocab_size: int) -> ModelConfig:
    return config_lib.tiny(vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                           head_dim=self.head_dim or None, qk_norm=self.qk_norm, d_ff=self.d_ff,
                           n_experts=self.n_experts, chunk_sizes=self.chunk_sizes,
                           n_slots=self.n_slots, slot_rank=self.slot_rank,
                           max_seq_len=max(self.seq_len, self.train_seq_len))

  def to_json(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    return json.loads(json.dumps(d))  # tuples -> lists, canonical

  @classmethod
  def from_json(cls, d: Dict[str, Any]) -> "PretrainConfig":
    # Fields added after a recipe was saved read as the value that recipe was trained with, not
    # today's default (an old cache must not pass for a new recipe).
    d = {**_FIELDS_BEFORE_THEY_EXISTED, **d}
    d["world"] = world_lib.WorldConfig(**d["world"])
    for k in ("d_ff", "n_experts", "chunk_sizes"):
      d[k] = tuple(d[k])
    d["mixture"] = tuple((str(a), float(b)) for a, b in d["mixture"])
    return cls(**d)


_FIELDS_BEFORE_THEY_EXISTED = dict(head_dim=0, qk_norm=False,
                                   multi_min_sentences=world_lib.N_SENTENCES,
                                   multi_max_sentences=world_lib.N_SENTENCES,
                                   sentence_curriculum_steps=0)


def runlocal() -> PretrainConfig:
  """A seconds-long recipe for unit tests (tiny world, tiny model, a few steps)."""
  w = world_lib.WorldConfig(n_pretrain=20, n_qa=20, n_reading=20, n_heldout=10, n_chunks=2, chunk_size=5,
                            n_first_names=20, n_last_names=20)
  return PretrainConfig(world=w, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=(0, 64),
                        n_slots=2, slot_rank=4, batch_size=8, max_steps=6, eval_every=3,
                        eval_people=5, warmup_steps=2, train_seq_len=64)  # one batch shape


class BaseModel(NamedTuple):
  params: Any
  cfg: ModelConfig
  tokenizer: WordTokenizer
  world: Any  # the corpus (``corpus_for``): a world_lib.World for the world recipe
  recipe: PretrainConfig
  metrics: Dict[str, Any]  # training log and final accuracies


# ----------------------------------------------------------------------------------------------
# Loss and update step.
# ----------------------------------------------------------------------------------------------
def masked_lm_loss(params, batch, cfg: ModelConfig, slot_mask=None):
  """``losses.lm.lm_loss`` averaged per example (optional ``loss_weight``); ``(loss, metrics)``."""
  batch = dict(batch)
  if slot_mask is not None:
    batch["slot_mask"] = slot_mask
  loss, m = lm_loss(params, batch, None, cfg=cfg, per_example=True)
  return loss, {"loss": loss, "token_acc": m["accuracy"]}


def make_optimizer(recipe: PretrainConfig) -> optax.GradientTransformation:
  """The recipe's AdamW (warmup, cosine to ``final_lr_fraction`` x lr, global-norm clip) via the
  one optimizer factory, ``parallel.state.make_optimizer``."""
  import ml_collections
  return state_lib.make_optimizer(ml_collections.ConfigDict(dict(
      name="adamw", lr=recipe.lr, warmup_steps=recipe.warmup_steps,
      decay_steps=max(recipe.max_steps, recipe.warmup_steps + 1),
      final_lr_fraction=recipe.final_lr_fraction,
      b1=0.9, b2=0.98, weight_decay=recipe.weight_decay, grad_clip=recipe.grad_clip)))


def loss_fn_for(cfg: ModelConfig) -> Callable:
  """``loss_fn(params, batch, rng) -> (loss, metrics)`` in ``parallel.state``'s interface."""

  def loss_fn(params, batch, rng):
    del rng
    return masked_lm_loss(params, batch, cfg, slot_mask=batch.get("slot_mask"))

  return loss_fn


# ----------------------------------------------------------------------------------------------
# Corpora: the world, or any object with the same small interface (``tokenizer``,
# ``sample_train_example(rng, mixture, **sample_kwargs)``, ``probe_sets(n)``, ``eval_sets()``).
# ----------------------------------------------------------------------------------------------
def corpus_for(recipe: PretrainConfig):
  """The corpus ``recipe.corpus`` names."""
  if recipe.corpus == "world":
    return world_lib.World(recipe.world)
  if recipe.corpus == "streams":
    from sleep_jax.data import long_horizon
    return long_horizon.StreamCorpus()
  if recipe.corpus.startswith("arc:"):  # generated ARC-like tasks (experiments/few_shot)
    from sleep_jax.data import arc_corpus
    return arc_corpus.ArcCorpus.from_name(recipe.corpus)
  raise ValueError(f"corpus={recipe.corpus!r}; valid: 'world', 'streams', 'arc:<spec>' "
                   "(arc_corpus.corpus_name)")


def probe_sets(corpus, n: int):
  """(probe, probe_train_tpl, groups): the stopping rule's in-context set (eval templates), its
  train-template twin, and the ``Example.attribute`` values accuracy is reported per."""
  if isinstance(corpus, world_lib.World):
    people = corpus.population("heldout")[:n]
    return (corpus.in_context_set(people, "eval"), corpus.in_context_set(people, "train")[::3],
            world_lib.ATTRIBUTES)
  return corpus.probe_sets(n)


def report_card(params, cfg: ModelConfig, corpus, recipe: PretrainConfig) -> Dict[str, Any]:
  """Final accuracies (``evaluate``), plus ``dream_quality`` for the world."""
  if isinstance(corpus, world_lib.World):
    return {"final": evaluate(params, cfg, corpus, seq_len=recipe.seq_len),
            "dreams": dream_quality(params, cfg, corpus,
                                    corpus.population("heldout")[:recipe.eval_people])}
  return {"final": {k: qa_eval.exact_match(params, cfg, corpus.tokenizer, v,
                                           seq_len=recipe.seq_len)
                    for k, v in corpus.eval_sets().items()}}


# ----------------------------------------------------------------------------------------------
# Evaluation sets.
# ----------------------------------------------------------------------------------------------
def eval_sets(world: world_lib.World, n_heldout: Optional[int] = None,
              n_closed: Optional[int] = 200) -> Dict[str, list]:
  """The base model's report card (eval question templates unless named ``*_train_tpl``).

  * ``incontext_heldout``: reading skill on never-seen people, held-out question wording;
  * ``closed_qa`` / ``closed_qa_train_tpl``: recall of the QA population's memorised facts;
  * ``closed_pretrain``: closed-book on people whose biographies were only read;
  * ``closed_new``: closed-book on never-seen people (chance level).
  """
  held = world.population("heldout")[:n_heldout]
  sub = lambda pop: world.population(pop)[:n_closed]
  new = [p for k in range(world.cfg.n_chunks) for p in world.chunk(k)]
  return {
      "incontext_heldout": world.in_context_set(held, "eval"),
      "closed_qa": world.closed_book_set(sub("qa"), "eval"),
      "closed_qa_train_tpl": world.closed_book_set(sub("qa"), "train"),
      "closed_pretrain": world.closed_book_set(sub("pretrain"), "eval"),
      "closed_new": world.closed_book_set(new, "eval"),
  }


def evaluate(params, cfg: ModelConfig, world: world_lib.World, seq_len: int = 64,
             **kwargs) -> Dict[str, float]:
  tok = world.tokenizer
  return {k: qa_eval.exact_match(params, cfg, tok, v, seq_len=seq_len)
          for k, v in eval_sets(world, **kwargs).items()}


def dream_quality(params, cfg: ModelConfig, world: world_lib.World, people, *,
                  samples_per_person: int = 2, max_new_tokens: int = 32,
                  temperature: float = 1.0, seed: int = 0) -> Dict[str, float]:
  """What the cycle's dreaming would write: samples ``bos + passage`` (variant 0) continuations
  at ``temperature`` and parses them as ``Q: <question> A: <answer> eos``.

  Returns fractions of samples: ``format_ok`` (``Q: ... A: <one word> eos``, any question),
  ``well_formed`` (a known question template about this person,
  a one-word answer, then eos), ``correct`` (well-formed and the answer is the person's value of
  the asked attribute), ``eos_first`` (the continuation is empty: the model just ends the
  passage), and ``distinct_attributes`` (mean number of distinct attributes asked per person)."""
  from sleep_jax.model import sampler
  tok = world.tokenizer
  people = list(people)
  rows = [tok.encode(world.passage(p, 0), add_bos=True) for p in people
          for _ in range(samples_per_person)]
  owners = [p for p in people for _ in range(samples_per_person)]
  toks, valid = sampler.left_pad(rows, tok.pad_id)
  out = sampler.sample(params, jnp.asarray(toks), jnp.asarray(valid), jax.random.PRNGKey(seed),
                       cfg=cfg, max_new_tokens=max_new_tokens, temperature=temperature,
                       stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)
  comp = np.asarray(out.tokens[:, toks.shape[1]:])
  live = np.asarray(out.completion_mask[:, toks.shape[1]:])
  n_ok = n_correct = n_eos = n_fmt = 0
  asked: Dict[int, set] = {}
  for person, c, m in zip(owners, comp, live):
    ids = [int(t) for t in c[m]]
    if ids[:1] == [tok.eos_id]:
      n_eos += 1
      continue
    if not ids or ids[-1] != tok.eos_id:
      continue
    text = tok.decode(ids[:-1])
    if not (text.startswith("Q: ") and " A: " in text):
      continue
    q, a = text[3:].rsplit(" A: ", 1)
    n_fmt += len(tok.encode(a)) == 1
    hit = [attr for attr in world_lib.ATTRIBUTES for t in range(len(world_lib.QUESTIONS[attr]))
           if world.question(person, attr, t) == q]
    if not hit or len(tok.encode(a)) != 1:
      continue
    n_ok += 1
    n_correct += a == person.attrs[hit[0]]
    asked.setdefault(person.pid, set()).add(hit[0])
  n = max(len(rows), 1)
  return {"format_ok": round(n_fmt / n, 4), "well_formed": round(n_ok / n, 4), "correct": round(n_correct / n, 4),
          "eos_first": round(n_eos / n, 4),
          "distinct_attributes": round(float(np.mean([len(v) for v in asked.values()]))
                                       if asked else 0.0, 2)}


# ----------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------
def sample_kwargs(recipe: PretrainConfig, step: Optional[int] = None) -> Dict[str, Any]:
  """``World.sample_train_example`` keyword arguments of ``recipe`` (at training ``step``, for
  the reading curriculum; None = after it)."""
  lo, hi = recipe.multi_min_sentences, recipe.multi_max_sentences
  if step is not None and step < recipe.sentence_curriculum_steps:
    hi = lo + (hi - lo) * step // recipe.sentence_curriculum_steps
  return dict(n_questions=(recipe.multi_min_questions, recipe.multi_max_questions),
              question_weight=recipe.question_weight,
              first_q_weight=None if recipe.first_q_weight < 0 else recipe.first_q_weight,
              max_len=max(recipe.seq_len, recipe.train_seq_len),
              bio_eos_weight=recipe.bio_eos_weight,
              n_sentences=(lo, hi))


def encode_train_batch(tok: WordTokenizer, examples, recipe: PretrainConfig
                       ) -> Dict[str, np.ndarray]:
  """``world.encode_batch`` padded to the longest example rounded up to 16 tokens (at least
  ``seq_len``, at most ``train_seq_len``): few shapes, little padding."""
  longest = max(len(tok.encode(e.prompt)) + len(tok.encode(e.target)) + 2 for e in examples)
  width = min(max(recipe.seq_len, -(-longest // 16) * 16), max(recipe.seq_len,
                                                               recipe.train_seq_len))
  return world_lib.encode_batch(tok, examples, width)


def pretrain(recipe: PretrainConfig, log: Callable[[str], None] = _print) -> BaseModel:
  """Trains the base model from scratch (no caching; see ``pretrain_or_load``)."""
  world = corpus_for(recipe)
  tok = world.tokenizer
  cfg = recipe.model_config(tok.vocab_size)
  init_params = lambda r: transformer.init(r, cfg)
  optimizer = state_lib.with_cms_frequencies(
      make_optimizer(recipe), transformer.param_shapes(cfg), chunk_sizes=cfg.chunk_sizes)
  state, _ = state_lib.create_train_state(recipe.seed, init_params, optimizer)
  step_fn = state_lib.make_train_step(loss_fn_for(cfg), optimizer)
  mixture = dict(recipe.mixture)
  rng = np.random.default_rng([recipe.seed, 7])
  probe, probe_train_tpl, groups = probe_sets(world, recipe.eval_people)
  history, t0, train_time = [], time.time(), 0.0
  reached = {}
  for step in range(1, recipe.max_steps + 1):
    sample_kw = sample_kwargs(recipe, step)
    examples = [world.sample_train_example(rng, mixture, **sample_kw)
                for _ in range(recipe.batch_size)]
    batch = encode_train_batch(tok, examples, recipe)
    ts = time.time()
    state, m = step_fn(state, batch)
    if step % recipe.eval_every == 0 or step == recipe.max_steps:
      jax.block_until_ready(state)
      train_time += time.time() - ts
      ok = qa_eval.exact_match_per_example(state.params, cfg, tok, probe, seq_len=recipe.seq_len)
      acc = float(ok.mean())
      acc_tr = qa_eval.exact_match(state.params, cfg, tok, probe_train_tpl, seq_len=recipe.seq_len)
      in_group = {a: np.array([e.attribute == a for e in probe], bool) for a in groups}
      per_attr = {a: round(float(ok[m].mean()), 2) for a, m in in_group.items() if m.any()}
      rec = {"step": step, "train_s": round(train_time, 1), "wall_s": round(time.time() - t0, 1),
             "loss": round(float(m["loss"]), 4), "incontext_heldout": round(acc, 4),
             "incontext_heldout_train_tpl": round(acc_tr, 4), "per_attribute": per_attr}
      for thr in (0.5, 0.7, 0.8, 0.9):
        if acc >= thr and str(thr) not in reached:
          reached[str(thr)] = {"step": step, "wall_s": rec["wall_s"]}
      history.append(rec)
      log(json.dumps(rec))
      if acc >= recipe.target_incontext:
        break
    else:
      train_time += time.time() - ts
  params = jax.block_until_ready(state.params)
  wall = round(time.time() - t0, 1)
  card = report_card(params, cfg, world, recipe)
  metrics = {"history": history, "reached": reached, **card,
             "steps": step, "wall_s": wall, "train_s": round(train_time, 1),
             "n_params": transformer.count_params(params)}
  log(json.dumps({**card, "steps": step, "wall_s": wall}))
  return BaseModel(params, cfg, tok, world, recipe, metrics)


# ----------------------------------------------------------------------------------------------
# Cache.
# ----------------------------------------------------------------------------------------------
_PARAMS, _TOK, _META = "params.npz", "tokenizer.json", "base_model.json"


def _flatten(params) -> Dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in flat}


def _unflatten(flat: Dict[str, np.ndarray]):
  out: Dict[str, Any] = {}
  for key, v in flat.items():
    d = out
    *head, last = key.split("/")
    for h in head:
      d = d.setdefault(h, {})
    d[last] = jnp.asarray(v)
  return out


def save(base: BaseModel, directory: str) -> None:
  """Writes params (npz), tokenizer (json) and recipe + model config + metrics (json)."""
  os.makedirs(directory, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=directory, prefix=".tmp_")
  np.savez(os.path.join(tmp, _PARAMS), **_flatten(base.params))
  base.tokenizer.save(os.path.join(tmp, _TOK))
  meta = {"recipe": base.recipe.to_json(), "model_config": base.cfg.to_config().to_dict(),
          "metrics": base.metrics}
  with open(os.path.join(tmp, _META), "w") as f:
    json.dump(meta, f, indent=1)
  for name in (_PARAMS, _TOK, _META):  # meta last: its presence marks a complete cache
    os.replace(os.path.join(tmp, name), os.path.join(directory, name))
  os.rmdir(tmp)


def load(directory: str) -> BaseModel:
  with open(os.path.join(directory, _META)) as f:
    meta = json.load(f)
  recipe = PretrainConfig.from_json(meta["recipe"])
  cfg = ModelConfig.from_config(meta["model_config"])
  with np.load(os.path.join(directory, _PARAMS)) as z:
    params = _unflatten({k: z[k] for k in z.files})
  tok = WordTokenizer.load(os.path.join(directory, _TOK))
  return BaseModel(params, cfg, tok, corpus_for(recipe), recipe, meta["metrics"])


def is_cached(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, _META))


def pretrain_or_load(cache_dir: str, recipe: PretrainConfig = PretrainConfig(),
                     log: Callable[[str], None] = _print) -> BaseModel:
  """Loads the base model cached in ``cache_dir``, or trains it and caches it there.

  Raises if ``cache_dir`` holds a model of a different recipe (use another directory)."""
  if is_cached(cache_dir):
    base = load(cache_dir)
    if base.recipe != recipe:
      raise ValueError(f"{cache_dir} caches a base model of another recipe:\n{base.recipe}\n"
                       f"requested:\n{recipe}\nuse another cache directory")
    if base.tokenizer.itos != base.world.tokenizer.itos:
      raise ValueError(f"{cache_dir}: cached tokenizer differs from the world's tokenizer")
    log(f"loaded base model from {cache_dir}")
    return base
  packaged = packaged_base(recipe)
  if packaged is not None:
    base = load(packaged)
    save(base, cache_dir)
    log(f"using the packaged base model {packaged} (its recipe is the requested one); "
        f"copied to {cache_dir}")
    return base
  base = pretrain(recipe, log=log)
  save(base, cache_dir)
  log(f"cached base model in {cache_dir}")
  return base


# Base models that ship with the package (``sleep_jax/assets/<name>``, made with
# ``python -m sleep_jax.sleep.pretrain sleep_jax/assets/<name>``): the default world recipe takes
# ~10 CPU-minutes to pretrain, which would not leave the README's main job its 10 minutes.
ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def packaged_base(recipe: PretrainConfig) -> Optional[str]:
  """The directory of a shipped base model trained with exactly ``recipe``, or None."""
  if not os.path.isdir(ASSETS_DIR):
    return None
  for name in sorted(os.listdir(ASSETS_DIR)):
    d = os.path.join(ASSETS_DIR, name)
    if is_cached(d):
      with open(os.path.join(d, _META)) as f:
        same_recipe = PretrainConfig.from_json(json.load(f)["recipe"]) == recipe
      # The world's text can change without its config changing: the vocabulary tells.
      if same_recipe and (WordTokenizer.load(os.path.join(d, _TOK)).itos
                          == corpus_for(recipe).tokenizer.itos):
        return d
  return None


def main(argv=None):
  """``python -m sleep_jax.sleep.pretrain CACHE_DIR [key=value ...]`` (recipe overrides)."""
  import sys
  argv = sys.argv[1:] if argv is None else argv
  if not argv:
    raise SystemExit(main.__doc__)
  recipe = PretrainConfig()
  over = {}
  for kv in argv[1:]:
    k, v = kv.split("=", 1)
    over[k] = json.loads(v)
  if over:
    d = recipe.to_json()
    for k, v in over.items():
      if k.startswith("world."):
        d["world"][k[6:]] = v
      else:
        d[k] = v
    recipe = PretrainConfig.from_json(d)
  pretrain_or_load(argv[0], recipe)


if __name__ == "__main__":
  main()
