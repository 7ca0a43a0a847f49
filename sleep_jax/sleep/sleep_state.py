"""The one checkpointed state of a (method, seed) run: the model, its slot mask, the dream
generator, and where the run stands (chunk, phase, episodic memory, results so far).

Arrays (``arrays()``) go to the checkpoint as a pytree; everything else (``position()``) as JSON
beside them. A killed run restores both and continues at the phase boundary it reached.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import jax

from sleep_jax.sleep.dreaming import Generator
from sleep_jax.sleep.memory import EpisodicMemory


@dataclasses.dataclass
class SleepState:
  params: Any
  slot_mask: Any
  generator: Optional[Generator] = None  # the ReST-EM dream generator (persists across sleeps)
  chunk: int = 0  # the wake chunk in progress
  phase: int = 0  # index into cycle.PHASES
  slot: Any = -1  # the slot(s) this chunk's consolidation unlocked (-1: none)
  counter: int = 0  # checkpoints written (the checkpoint step)
  global_step: int = 0  # optimizer steps of every phase so far (the training curves' x axis)
  memory: EpisodicMemory = dataclasses.field(default_factory=EpisodicMemory)
  R: List[List[float]] = dataclasses.field(default_factory=list)  # accuracy matrix rows
  info: List[Dict[str, Any]] = dataclasses.field(default_factory=list)  # per-chunk metrics
  answers: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  generator_step: int = 0  # dream-generator training steps done (before the stream)
  generator_info: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  retention_before: Dict[str, float] = dataclasses.field(default_factory=dict)

  def arrays(self) -> Dict[str, Any]:
    st = {"params": self.params, "slot_mask": self.slot_mask}
    if self.generator is not None:
      st["generator"] = {"lora": self.generator.lora, "opt_state": self.generator.opt_state}
    return st

  def committed(self) -> "SleepState":
    """The arrays pinned to the devices they are on. A restored checkpoint's arrays are
    committed; a fresh run's are not, and jit compiles separately for the two (a resumed
    process would compile every phase twice: once for the restored method, once for the next)."""
    return self._with_arrays(jax.tree.map(lambda x: jax.device_put(x, x.sharding), self.arrays()))

  def _with_arrays(self, arrays: Dict[str, Any]) -> "SleepState":
    gen = self.generator
    if gen is not None:
      gen = gen._replace(lora=arrays["generator"]["lora"],
                         opt_state=arrays["generator"]["opt_state"])
    return dataclasses.replace(self, params=arrays["params"], slot_mask=arrays["slot_mask"],
                               generator=gen)

  def position(self) -> Dict[str, Any]:
    return {"chunk": self.chunk, "phase": self.phase, "slot": self.slot, "counter": self.counter,
            "global_step": self.global_step,
            "memory": self.memory.to_json(), "R": self.R, "info": self.info,
            "answers": self.answers, "generator_step": self.generator_step,
            "generator_info": self.generator_info, "retention_before": self.retention_before}

  def restored(self, arrays: Dict[str, Any], position: Dict[str, Any]) -> "SleepState":
    """This state (the fresh one, for the generator's scale) with a checkpoint's contents."""
    fields = {f.name for f in dataclasses.fields(self)}
    pos = {k: v for k, v in position.items() if k in fields}  # the checkpointer adds "step"
    pos["memory"] = EpisodicMemory.from_json(pos["memory"])
    return dataclasses.replace(self._with_arrays(arrays), **pos)
