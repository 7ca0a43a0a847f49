"""Episodic memory: what wake saw, kept for the next sleep (docs/method.md section 3).

During wake every chunk's items (a privileged context such as a document or demonstrations, and
the prompts asked about it) are written here. Consolidation reads the items of the current wake
and, optionally, replays a fraction of older ones so earlier knowledge is rehearsed. The buffer
is plain JSON-serialisable data so it is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence

import numpy as np


@dataclasses.dataclass
class Episode:
  """One remembered item: ``context`` is privileged (the teacher sees it, the student does not)."""

  id: str
  context: str
  prompts: List[str]
  cycle: int = 0
  meta: Dict[str, Any] = dataclasses.field(default_factory=dict)


class EpisodicMemory:
  """Append-only buffer of episodes with bounded capacity (oldest dropped first)."""

  def __init__(self, capacity: int = 100_000):
    self.capacity = capacity
    self.episodes: List[Episode] = []

  def __len__(self) -> int:
    return len(self.episodes)

  def add(self, episodes: Sequence[Episode]) -> None:
    self.episodes.extend(episodes)
    if len(self.episodes) > self.capacity:
      self.episodes = self.episodes[-self.capacity:]

  def annotate(self, cycle: int, by_id: Dict[str, Dict[str, Any]]) -> None:
    """Adds ``by_id[episode.id]`` to the ``meta`` of wake ``cycle``'s episodes (what a sleep
    made of them, e.g. its accepted dreams' questions, for later sleeps to replay)."""
    for e in self.recent(cycle):
      e.meta.update(by_id.get(e.id, {}))

  def meta_by_id(self, key: str) -> Dict[str, Any]:
    """``{episode id: meta[key]}`` over the episodes that have ``key``."""
    return {e.id: e.meta[key] for e in self.episodes if key in e.meta}

  def recent(self, cycle: int) -> List[Episode]:
    """Episodes written during wake ``cycle``."""
    return [e for e in self.episodes if e.cycle == cycle]

  def sample_for_sleep(self, cycle: int, rng: np.random.Generator,
                       replay_fraction: float = 0.0, max_items: Optional[int] = None) -> List[Episode]:
    """The current wake's episodes plus ``replay_fraction`` as many older ones, drawn uniformly."""
    new = self.recent(cycle)
    old = [e for e in self.episodes if e.cycle < cycle]
    n_replay = min(len(old), int(round(replay_fraction * len(new))))
    picked = list(new)
    if n_replay:
      picked += [old[i] for i in rng.choice(len(old), size=n_replay, replace=False)]
    if max_items is not None and len(picked) > max_items:
      picked = [picked[i] for i in sorted(rng.choice(len(picked), size=max_items, replace=False))]
    return picked

  def to_json(self) -> str:
    return json.dumps({"capacity": self.capacity,
                       "episodes": [dataclasses.asdict(e) for e in self.episodes]})

  @classmethod
  def from_json(cls, text: str) -> "EpisodicMemory":
    d = json.loads(text)
    m = cls(d["capacity"])
    m.episodes = [Episode(**e) for e in d["episodes"]]
    return m
