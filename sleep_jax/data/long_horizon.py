"""Long-horizon memory: procedurally generated streams far longer than the model's context.

A stream is read chunk by chunk (one wake phase per chunk); only a chunk fits in the context, so
what the model knows at the end about earlier chunks must live in its weights (what sleep
consolidates). Two families, both deterministic by seed, with single-token answers:

* **needles** (multi-key needle-in-a-haystack, MK-NIAH style): many facts ``The code of <key>
  is <value>.`` spread over filler sentences; at the end, every key is queried.
* **story** (bAbI / BABILong style): entities move between places over time (``Mary went to the
  kitchen.``) among filler; at the end, questions ask for the latest state (``Where is Mary
  now?``) and earlier states (``Before the kitchen, where was Mary?``).

``needle_stream`` / ``story_stream`` return a ``LongStream``:

* ``chunks``: ``List[List[documents.Document]]`` (one document per chunk): passage = the chunk's
  text; train_questions = questions answerable from that chunk alone (train templates);
  eval_questions = the end-of-stream queries (eval templates, disjoint from the train ones).
  ``placement="source"`` (default) attaches each end-of-stream query to the chunk whose text
  holds its answer, so the last row of the driver's accuracy matrix is accuracy against
  distance; ``placement="end"`` puts every query on the last chunk.
* ``distance``: eval question text -> how many chunks back the answer lies at the end of the
  stream (0 = the last chunk, ``n_chunks - 1`` = the first). Question texts are unique within a
  stream, so the text is the id.
* ``kind``: eval question text -> ``"needle"`` | ``"latest"`` | ``"before"``.

``solve(stream_passages, question)`` is a reference solver that reads only the chunk texts and
recomputes every answer and its source chunk (the tests check the generator against it).
``vocabulary()`` lists every word these streams use, for ``tokenizer.WordTokenizer``.

Default sizes: with the word tokenizer a chunk plus a ``Q: ... A:`` question fits the tiny
model's 64-token context (``WorldFormat.with_context``), while the 8-chunk stream is ~280 tokens.
With ``placement="source"`` a story chunk can hold no end-of-stream query (no answer lies there);
the driver must skip such chunks when averaging (see experiments/long_horizon/README.md).
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple

from sleep_jax.data import documents

# ----------------------------------------------------------------------------------------------
# Word lists (every answer is one word).
# ----------------------------------------------------------------------------------------------
KEYS = ("zorp", "blick", "quan", "fesh", "mivo", "tral", "gorn", "plib", "wund", "snek", "vast",
        "hobi", "krel", "dwim", "yulo", "brix", "clom", "frit", "jask", "lurn", "marp", "nifo",
        "prax", "quib", "roff", "sulk", "tazz", "ulby", "veen", "wopp", "xell", "yarb", "zint",
        "abro", "bemo", "cusp", "delf", "egan", "fulo", "gibb")
VALUES = ("tiger", "lemon", "anchor", "violin", "pepper", "comet", "walnut", "hammer", "tulip",
          "falcon", "marble", "rocket", "cactus", "helmet", "pickle", "saddle", "turnip", "zebra",
          "banjo", "candle", "dragon", "lantern", "mango", "otter", "parrot", "quartz", "ribbon",
          "spider", "trumpet", "velvet")
ENTITIES = ("Mary", "John", "Sandra", "Daniel", "Emma", "Liam", "Olivia", "Noah", "Ava", "Lucas")
PLACES = ("kitchen", "garden", "office", "hallway", "bathroom", "bedroom", "cellar", "attic",
          "porch", "library", "garage", "studio")
MOVE_VERBS = ("went", "moved", "travelled", "journeyed")
FILLER_NOUNS = ("grass", "sky", "sea", "road", "hill", "tree", "river", "cloud", "stone", "field",
                "wind", "lake")
FILLER_ADJS = ("green", "blue", "calm", "long", "quiet", "tall", "old", "wide", "grey", "bright",
               "cold", "soft")
FILLER_TEMPLATES = ("The {noun} is {adj}.", "It was a {adj} day by the {noun}.",
                    "Nobody saw the {noun}.", "The {noun} looked {adj} again.")

NEEDLE_FACT = "The code of {key} is {value}."
NEEDLE_TRAIN_Q = ("What is the code of {key}?",)
NEEDLE_EVAL_Q = ("Which code does {key} have?",)
MOVE_FACT = "{entity} {verb} to the {place}."
LATEST_TRAIN_Q = ("Where is {entity}?",)
LATEST_EVAL_Q = ("Where is {entity} now?",)
BEFORE_TRAIN_Q = ("Where was {entity} before the {place}?",)
BEFORE_EVAL_Q = ("Before the {place}, where was {entity}?",)

_WORD = re.compile(r"\w+|[^\w\s]")  # tokenizer.WordTokenizer's word pattern


def vocabulary() -> List[str]:
  """Every word (and punctuation mark) the streams use, sorted: ``WordTokenizer(vocabulary())``
  encodes every passage, question and answer without ``<unk>``."""
  texts = list(KEYS + VALUES + ENTITIES + PLACES + MOVE_VERBS + FILLER_NOUNS + FILLER_ADJS)
  texts += list(FILLER_TEMPLATES + NEEDLE_TRAIN_Q + NEEDLE_EVAL_Q + LATEST_TRAIN_Q + LATEST_EVAL_Q
                + BEFORE_TRAIN_Q + BEFORE_EVAL_Q) + [NEEDLE_FACT, MOVE_FACT, "Q: A:"]
  words = set()
  for t in texts:
    words.update(w for w in _WORD.findall(re.sub(r"\{\w+\}", " ", t)))
  return sorted(words)


# ----------------------------------------------------------------------------------------------
# Streams.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LongStream:
  name: str
  chunks: List[List[documents.Document]]  # one document per chunk
  distance: Dict[str, int]  # eval question text -> chunks back from the end (0 = last chunk)
  kind: Dict[str, str]  # eval question text -> "needle" | "latest" | "before"

  @property
  def passages(self) -> List[str]:
    return [docs[0].passage for docs in self.chunks]

  @property
  def queries(self) -> List[documents.Question]:
    return [q for docs in self.chunks for d in docs for q in d.eval_questions]

  def n_words(self) -> int:
    return sum(len(_WORD.findall(p)) for p in self.passages)


@dataclasses.dataclass(frozen=True)
class NeedleConfig:
  n_chunks: int = 8
  n_keys: int = 12  # facts in the stream (>= n_chunks: every chunk holds at least one)
  filler_per_chunk: int = 4  # filler sentences per chunk
  placement: str = "source"  # "source" | "end"


@dataclasses.dataclass(frozen=True)
class StoryConfig:
  n_chunks: int = 8
  moves_per_chunk: int = 3
  filler_per_chunk: int = 3
  n_entities: int = 4
  n_places: int = 6
  n_before: int = 12  # "before" queries at the end (at most; only unambiguous ones are asked)
  placement: str = "source"  # "source" | "end"


def _filler(rng: random.Random) -> str:
  return rng.choice(FILLER_TEMPLATES).format(noun=rng.choice(FILLER_NOUNS),
                                             adj=rng.choice(FILLER_ADJS))


def _mix(rng: random.Random, facts: Sequence[str], n_filler: int) -> str:
  """The facts in their order, with filler sentences at random positions between them."""
  slots = sorted(rng.randrange(len(facts) + 1) for _ in range(n_filler))
  out, f = [], 0
  for i, fact in enumerate(list(facts) + [None]):
    while f < len(slots) and slots[f] == i:
      out.append(_filler(rng))
      f += 1
    if fact is not None:
      out.append(fact)
  return " ".join(out)


def _assemble(name: str, texts: List[str], train_qs: List[List[documents.Question]],
              queries: List[Tuple[documents.Question, int, str]], placement: str) -> LongStream:
  n = len(texts)
  if placement not in ("source", "end"):
    raise ValueError(f"placement={placement!r}; valid: 'source', 'end'")
  evals: List[List[documents.Question]] = [[] for _ in range(n)]
  distance, kind = {}, {}
  for q, src, k in queries:
    if q.q in distance:
      raise AssertionError(f"duplicate query {q.q!r}")
    evals[src if placement == "source" else n - 1].append(q)
    distance[q.q], kind[q.q] = n - 1 - src, k
  chunks = [[documents.Document(f"{name}-c{t:03d}", texts[t], tuple(train_qs[t]), tuple(evals[t]))]
            for t in range(n)]
  return LongStream(name, chunks, distance, kind)


def needle_stream(seed: int, cfg: NeedleConfig = NeedleConfig()) -> LongStream:
  """Multi-key needles: ``cfg.n_keys`` facts over ``cfg.n_chunks`` chunks of filler."""
  if not cfg.n_chunks <= cfg.n_keys <= len(KEYS):
    raise ValueError(f"need n_chunks <= n_keys <= {len(KEYS)}")
  rng = random.Random(f"needles/{seed}")
  keys = rng.sample(KEYS, cfg.n_keys)
  # Every chunk gets one key, the rest go to random chunks.
  where = list(range(cfg.n_chunks)) + [rng.randrange(cfg.n_chunks)
                                       for _ in range(cfg.n_keys - cfg.n_chunks)]
  rng.shuffle(where)
  value = {k: rng.choice(VALUES) for k in keys}
  texts, train_qs, queries = [], [], []
  for t in range(cfg.n_chunks):
    here = [k for k, c in zip(keys, where) if c == t]
    texts.append(_mix(rng, [NEEDLE_FACT.format(key=k, value=value[k]) for k in here],
                      cfg.filler_per_chunk))
    train_qs.append([documents.Question(tpl.format(key=k), value[k])
                     for k in here for tpl in NEEDLE_TRAIN_Q])
    queries += [(documents.Question(tpl.format(key=k), value[k]), t, "needle")
                for k in here for tpl in NEEDLE_EVAL_Q]
  return _assemble(f"needles-s{seed}", texts, train_qs, queries, cfg.placement)


def story_stream(seed: int, cfg: StoryConfig = StoryConfig()) -> LongStream:
  """A bAbI-style story: ``cfg.moves_per_chunk`` moves per chunk among filler."""
  if cfg.n_entities > len(ENTITIES) or not 2 <= cfg.n_places <= len(PLACES):
    raise ValueError("too many entities or places for the word lists")
  rng = random.Random(f"story/{seed}")
  ents = rng.sample(ENTITIES, cfg.n_entities)
  places = rng.sample(PLACES, cfg.n_places)
  history: Dict[str, List[Tuple[str, int]]] = {e: [] for e in ents}  # (place, chunk)
  texts, train_qs = [], []
  for t in range(cfg.n_chunks):
    facts, moved = [], []
    for _ in range(cfg.moves_per_chunk):
      e = rng.choice(ents)
      cur = history[e][-1][0] if history[e] else None
      p = rng.choice([p for p in places if p != cur])
      history[e].append((p, t))
      facts.append(MOVE_FACT.format(entity=e, verb=rng.choice(MOVE_VERBS), place=p))
      moved.append(e)
    texts.append(_mix(rng, facts, cfg.filler_per_chunk))
    qs = []
    for e in dict.fromkeys(moved):  # where each mover is at the end of this chunk
      qs += [documents.Question(tpl.format(entity=e), history[e][-1][0]) for tpl in LATEST_TRAIN_Q]
    train_qs.append(qs)
  # Train "before" questions, answerable within a chunk: both moves in it, place visited once.
  visits = {e: [p for p, _ in h] for e, h in history.items()}
  for e, h in history.items():
    for i in range(1, len(h)):
      (prev, c0), (p, c1) = h[i - 1], h[i]
      if c0 == c1 and visits[e].count(p) == 1:
        train_qs[c1] += [documents.Question(tpl.format(entity=e, place=p), prev)
                         for tpl in BEFORE_TRAIN_Q]
  # End-of-stream queries.
  queries = []
  for e in ents:
    if history[e]:
      p, c = history[e][-1]
      queries += [(documents.Question(tpl.format(entity=e), p), c, "latest")
                  for tpl in LATEST_EVAL_Q]
  eligible = [(e, i) for e, h in history.items() for i in range(1, len(h))
              if visits[e].count(h[i][0]) == 1]
  rng.shuffle(eligible)
  covered = {c for _, c, _ in queries}
  # Prefer queries whose answer lies in a chunk no query covers yet (spread over distances).
  eligible.sort(key=lambda ei: history[ei[0]][ei[1] - 1][1] in covered)
  for e, i in eligible[:cfg.n_before]:
    (prev, c0), (p, _) = history[e][i - 1], history[e][i]
    queries += [(documents.Question(tpl.format(entity=e, place=p), prev), c0, "before")
                for tpl in BEFORE_EVAL_Q]
  return _assemble(f"story-s{seed}", texts, train_qs, queries, cfg.placement)


# ----------------------------------------------------------------------------------------------
# Reference solver: reads only the chunk texts.
# ----------------------------------------------------------------------------------------------
_SENT = re.compile(r"[^.?!]*[.?!]")
_NEEDLE_RE = re.compile(r"The code of (\w+) is (\w+)\.")
_MOVE_RE = re.compile(r"(\w+) (?:%s) to the (\w+)\." % "|".join(MOVE_VERBS))


def _pattern(template: str) -> re.Pattern:
  body = re.escape(template)
  for field in ("key", "entity", "place"):
    body = body.replace(re.escape("{" + field + "}"), f"(?P<{field}>\\w+)")
  return re.compile(body + "$")


def solve(passages: Sequence[str], question: str) -> Tuple[Optional[str], Optional[int]]:
  """(answer, chunk index holding the answer's sentence) from the texts alone; (None, None)
  when the stream does not determine it."""
  facts, moves = {}, []
  for t, text in enumerate(passages):
    for s in _SENT.findall(text):
      s = s.strip()
      m = _NEEDLE_RE.fullmatch(s)
      if m:
        facts[m.group(1)] = (m.group(2), t)
      m = _MOVE_RE.fullmatch(s)
      if m:
        moves.append((m.group(1), m.group(2), t))
  for tpl in NEEDLE_TRAIN_Q + NEEDLE_EVAL_Q:
    m = _pattern(tpl).match(question)
    if m:
      return facts.get(m["key"], (None, None))
  for tpl in LATEST_TRAIN_Q + LATEST_EVAL_Q:
    m = _pattern(tpl).match(question)
    if m:
      mine = [(p, t) for e, p, t in moves if e == m["entity"]]
      return mine[-1] if mine else (None, None)
  for tpl in BEFORE_TRAIN_Q + BEFORE_EVAL_Q:
    m = _pattern(tpl).match(question)
    if m:
      mine = [(p, t) for e, p, t in moves if e == m["entity"]]
      idx = [i for i, (p, _) in enumerate(mine) if p == m["place"]]
      if len(idx) != 1 or idx[0] == 0:
        return None, None  # ambiguous or no earlier place
      return mine[idx[0] - 1]
  return None, None


# ----------------------------------------------------------------------------------------------
# Pretraining corpus for the stream base model (``tasks.pretrain``, ``corpus="streams"``).
# ----------------------------------------------------------------------------------------------
TRAIN_SEEDS = (1000, 2000)  # streams the base model reads (never the evaluated seeds 0, 1, 2, ...)
MEMORISED_SEEDS = (2000, 2016)  # streams whose end state it memorises (closed-book format)
HELDOUT_SEEDS = (3000, 3100)  # never trained: the stopping-rule probe and the report card


class StreamCorpus:
  """What the stream base model learns from, in the interface ``tasks.pretrain`` trains on
  (``tokenizer``, ``sample_train_example``, ``probe_sets``, ``eval_sets``; examples are
  ``world.Example``). Both families, default sizes, train templates only:

  * ``text``: a chunk as plain text (language-model loss; what the SFT baseline trains on);
  * ``incontext_multi``: ``<chunk> Q: q1 A: a1 Q: q2 A: a2 ...`` over the chunk's train
    questions in random order (loss on the answers), the reading skill;
  * ``closed``: ``Q: q A: a`` closed-book on the end state of ``MEMORISED_SEEDS`` streams (the
    last answer of each train question), so that a question without context is answered from
    the weights in the same one-word format sleep consolidates into.
  """

  FAMILIES = ("needles", "story")

  def __init__(self):
    from sleep_jax.data.tokenizer import WordTokenizer
    self.tokenizer = WordTokenizer(vocabulary())
    self._cache: Dict[Tuple[str, int], LongStream] = {}
    self._memorised = [q for f in self.FAMILIES for s in range(*MEMORISED_SEEDS)
                       for q in self._end_state(self.stream(f, s))]

  def stream(self, family: str, seed: int) -> LongStream:
    key = (family, seed)
    if key not in self._cache:
      self._cache[key] = needle_stream(seed) if family == "needles" else story_stream(seed)
    return self._cache[key]

  @staticmethod
  def _end_state(s: LongStream) -> List[documents.Question]:
    last = {q.q: q for docs in s.chunks for d in docs for q in d.train_questions}
    return list(last.values())

  def sample_train_example(self, rng, mixture: Dict[str, float], *, max_len: Optional[int] = None,
                           **unused):
    from sleep_jax.data import world as world_lib
    comp = world_lib.sample_component(rng, mixture)
    if comp == "closed":
      q = self._memorised[rng.integers(len(self._memorised))]
      return world_lib.Example(f"Q: {q.q} A:", q.answer, "closed", -1, "", 0, -1)
    fam = self.FAMILIES[rng.integers(len(self.FAMILIES))]
    s = self.stream(fam, int(rng.integers(*TRAIN_SEEDS)))
    d = s.chunks[rng.integers(len(s.chunks))][0]
    if comp == "text":
      return world_lib.Example("", d.passage, "bio", -1, "", -1, 0)
    if comp != "incontext_multi":
      raise ValueError(f"unknown mixture component {comp!r}; known: closed, text, incontext_multi")
    qs = [d.train_questions[i] for i in rng.permutation(len(d.train_questions))]
    while True:  # drop questions from the end until the example fits max_len
      segs = [(qs[0].answer, 1.0)]
      for q in qs[1:]:
        segs += [(f"Q: {q.q} A:", 0.0), (q.answer, 1.0)]
      ex = world_lib.Example(f"{d.passage} Q: {qs[0].q} A:", " ".join(t for t, _ in segs),
                             "multi", -1, "", 0, 0, tuple(segs))
      n = len(self.tokenizer.encode(ex.prompt)) + len(self.tokenizer.encode(ex.target)) + 2
      if max_len is None or len(qs) == 1 or n <= max_len:
        return ex
      qs = qs[:-1]

  def _in_context(self, n_streams: int, split: str):
    """In-context questions on heldout streams, ``Example.attribute`` = kind; eval-template
    questions only where the chunk alone determines the answer (``solve``)."""
    from sleep_jax.data import world as world_lib
    out = []
    for f in self.FAMILIES:
      for seed in range(HELDOUT_SEEDS[0], HELDOUT_SEEDS[0] + n_streams):
        s = self.stream(f, seed)
        for docs in s.chunks:
          d = docs[0]
          for q in (d.train_questions if split == "train" else d.eval_questions):
            kind = s.kind.get(q.q) or ("needle" if f == "needles" else
                                       "before" if "before" in q.q else "latest")
            if split == "train" or solve([d.passage], q.q)[0] == q.answer:
              out.append(world_lib.Example(f"{d.passage} Q: {q.q} A:", q.answer, "incontext", -1,
                                           kind, 0, 0))
    return out

  def probe_sets(self, n: int):
    """(probe, probe_train_tpl, groups): the stopping rule's in-context set (eval templates),
    its train-template twin and the kinds per-group accuracy is reported for."""
    n_streams = max(1, n // 10)
    return (self._in_context(n_streams, "eval"), self._in_context(n_streams, "train")[::3],
            ("needle", "latest", "before"))

  def eval_sets(self) -> Dict[str, list]:
    """The base model's report card: reading on heldout streams (eval / train templates),
    recall of the memorised end states, and closed-book on heldout streams (chance)."""
    from sleep_jax.data import world as world_lib
    new = [world_lib.Example(f"Q: {q.q} A:", q.answer, "closed", -1, "", 0, -1)
           for f in self.FAMILIES for seed in range(HELDOUT_SEEDS[0], HELDOUT_SEEDS[0] + 10)
           for q in self.stream(f, seed).queries]
    return {"incontext_heldout": self._in_context(20, "eval"),
            "incontext_heldout_train_tpl": self._in_context(20, "train"),
            "closed_memorised": [world_lib.Example(f"Q: {q.q} A:", q.answer, "closed", -1, "", 0,
                                                   -1) for q in self._memorised],
            "closed_new": new}
