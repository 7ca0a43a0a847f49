"""One typed table of every method, baseline and ablation the cycle runs (docs/method.md section 5).

A ``Method`` says which phases learn and how: ``learn`` picks the learner ("none", "sft" or
"sleep"); ``consolidation`` / ``dreaming`` are overrides of the config's ``consolidation`` /
``dreaming`` blocks (None: the phase does not run), so an ablation is a row here, not a code path.
``consolidation_config`` and ``dreaming_config`` apply a row to a config.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping, Optional, Tuple, Union

import ml_collections

from sleep_jax.configs import loader

Overrides = Mapping[str, Any]
_NONE: Overrides = MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the table.

  Attributes:
    learn: "none" (no learning), "sft" (fine-tune every parameter), "grpo" (policy gradient on
      every parameter with the task's checker as reward, ``config.grpo``) or "sleep".
    consolidation: overrides of ``config.consolidation`` for consolidation and deep sleep; None:
      no consolidation (SEAL: accepted dreams train the existing weights).
    dreaming: overrides of ``config.dreaming``; None: no dreaming.
    deep: whether deep sleep (CMS level l-1 -> l) runs.
    levels: memory levels used (the first ``levels`` entries of ``sleep_every``); None: all.
    in_context: False, True (the passage in the prompt) or "window" (only the last chunk read).
    selfgen: SFT also trains on self-written dreams (no selection, no distillation).
    variants: SFT trains on task variants (TTT).
    questions: SFT also trains on the wake questions with their supported answers, closed-book
      (the data consolidation distils on: SFT and Sleep on equal data).
    items: SFT also trains on the consolidation's passage items (``prompt_templates``), each
      closed-book with the answer the model reading the passage wrote: the self-written data
      a sleep without task questions distils on, as hard labels into every parameter.
  """
  learn: str
  consolidation: Optional[Overrides] = None
  dreaming: Optional[Overrides] = None
  deep: bool = True
  levels: Optional[int] = None
  in_context: Union[bool, str] = False
  selfgen: bool = False
  variants: bool = False
  questions: bool = False
  items: bool = False

  @property
  def expands(self) -> bool:
    """Whether this method's consolidation unlocks new capacity (only new capacity learns)."""
    return self.consolidation is not None and self.consolidation.get("expand", True)


_SLEEP, _OPSD = _NONE, MappingProxyType({"alpha": 1.0, "lam": 1.0, "expand": False})

METHODS: Mapping[str, Method] = MappingProxyType({
    "base": Method("none"),  # closed-book, no learning
    "in_context": Method("none", in_context=True),  # the passage in the prompt: upper bound
    "sft": Method("sft"),  # fine-tune every parameter on the passages
    "sft_selfgen": Method("sft", selfgen=True),  # + self-generated data, no RL selection
    "sft_items": Method("sft", items=True),  # + the consolidation's items: data vs method
    "sft_questions": Method("sft", questions=True),  # + the wake questions and their answers
    "opsd": Method("sleep", consolidation=_OPSD, deep=False),
    "opsd_expansion": Method("sleep", consolidation=MappingProxyType({"alpha": 1.0, "lam": 1.0}),
                             deep=False),
    "sleep_no_dream": Method("sleep", consolidation=_SLEEP),
    "sleep": Method("sleep", consolidation=_SLEEP, dreaming=_NONE),
    "sleep_no_imitation": Method("sleep", consolidation=MappingProxyType({"alpha": 1.0}),
                                 dreaming=_NONE),
    "sleep_no_semantic": Method("sleep", consolidation=MappingProxyType({"gamma": 0.0}),
                                dreaming=_NONE),
    "sleep_no_expansion": Method("sleep", consolidation=MappingProxyType({"expand": False}),
                                 dreaming=_NONE, deep=False),
    "sleep_no_random_expert": Method("sleep", consolidation=_SLEEP,
                                     dreaming=MappingProxyType({"random_expert": False})),
    "sleep_no_grad_selection": Method("sleep", consolidation=_SLEEP,
                                      dreaming=MappingProxyType({"score": "random"})),
    # Few-shot (ARC) baselines: TTT = SFT on the demonstrations as leave-one-out tasks plus task
    # variants, no RL; SEAL = ReST-EM dreaming whose accepted dreams train the existing weights.
    "ttt": Method("sft", variants=True),
    "seal": Method("sleep", dreaming=_NONE, deep=False),
    # Long-horizon memory: the truncated context window; sleep with n memory levels.
    "in_context_window": Method("none", in_context="window"),
    "sleep_l1": Method("sleep", consolidation=_SLEEP, levels=1),
    "sleep_l2": Method("sleep", consolidation=_SLEEP, levels=2),
    "sleep_l4": Method("sleep", consolidation=_SLEEP, levels=4),
    # Sleep (dreaming included) over n memory levels (the paper's Table 3 "2 levels" and "4
    # levels"): the first n entries of ``sleep_every``; 1 = every sleep stays in the fast level.
    "sleep_1_level": Method("sleep", consolidation=_SLEEP, dreaming=_NONE, levels=1),
    "sleep_2_levels": Method("sleep", consolidation=_SLEEP, dreaming=_NONE, levels=2),
    "sleep_4_levels": Method("sleep", consolidation=_SLEEP, dreaming=_NONE, levels=4),
    # Reasoning with verifiable rewards: GRPO on the wake questions, rewarded by the checker.
    "grpo": Method("grpo"),
    # Sleep whose dreaming is dream simulation only (``dreaming.simulate``) vs without it.
    "sleep_no_simulation": Method("sleep", consolidation=_SLEEP,
                                  dreaming=MappingProxyType({"simulate": 0})),
})

ONE_LINE = {
    "base": "the model as it is, closed-book",
    "in_context": "the passage in the prompt (the in-context ceiling)",
    "sft": "fine-tune every parameter on the passages",
    "sft_selfgen": "SFT on the passages plus self-written dreams (no selection)",
    "sft_items": "SFT on the passages plus the model's own answers to the consolidation's items",
    "sft_questions": "SFT on the passages plus the wake questions with their answers",
    "opsd": "on-policy self-distillation into the existing weights (no expansion)",
    "opsd_expansion": "on-policy self-distillation into a new slot",
    "sleep_no_dream": "Sleep with consolidation only",
    "sleep": "consolidation into new slots, dreaming, deep sleep",
    "sleep_no_imitation": "Sleep without the learning-to-imitate reward",
    "sleep_no_semantic": "Sleep without the semantic reward",
    "sleep_no_expansion": "Sleep training existing weights instead of new slots",
    "sleep_no_random_expert": "Sleep dreaming without the random extra expert",
    "sleep_no_grad_selection": "Sleep keeping random dreams instead of gradient-selected ones",
    "ttt": "test-time training on the demonstrations and their variants",
    "seal": "ReST-EM self-edits trained into the existing weights",
    "in_context_window": "only the last chunk read in the prompt",
    "sleep_l1": "Sleep with 1 memory level",
    "sleep_l2": "Sleep with 2 memory levels",
    "sleep_l4": "Sleep with 4 memory levels",
    "sleep_1_level": "Sleep (with dreaming) keeping every sleep in the fast memory level",
    "sleep_2_levels": "Sleep (with dreaming) with 2 memory levels",
    "sleep_4_levels": "Sleep (with dreaming) with 4 memory levels",
    "grpo": "GRPO on the wake questions with the checker's reward (every parameter)",
    "sleep_no_simulation": "Sleep whose dreaming writes no checkable environments",
}


def get(name: str) -> Method:
  return loader.pick(METHODS, name, "method")


def _with(block: ml_collections.ConfigDict, overrides: Overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(block.to_dict())
  for k, v in overrides.items():
    if k not in c:
      raise KeyError(f"method override {k!r} is not a key of the block; valid: {sorted(c)}")
    c[k] = v
  return c


def consolidation_config(method: Method, block: ml_collections.ConfigDict
                         ) -> ml_collections.ConfigDict:
  """``config.consolidation`` with the method's overrides (a copy)."""
  return _with(block, method.consolidation or _NONE)


def dreaming_config(method: Method, block: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.dreaming`` with the method's overrides (a copy)."""
  return _with(block, method.dreaming or _NONE)


def sleep_schedule(sleep_every: Tuple[int, ...], method: Method, n_levels: int) -> tuple:
  """``(C_0, C_1, ..., C_{L-1})``: CMS level 0 receives the context every chunk (``C_0 = 1``),
  level l receives level l-1 every ``C_l`` chunks (docs/method.md section 3). ``sleep_every`` truncated to
  the method's ``levels`` (all by default; 1 without deep sleep) and the model's ``n_levels``."""
  every = tuple(int(x) for x in sleep_every)
  if not every or every[0] != 1 or any(b % a for a, b in zip(every, every[1:])):
    raise ValueError(f"sleep_every={every}: C_0 must be 1 and each C_l a multiple of C_(l-1)")
  n = (method.levels or len(every)) if method.deep else 1
  if n > len(every):
    raise ValueError(f"method wants {n} memory levels; sleep_every={every} names {len(every)}")
  return every[:min(n, n_levels)]


def levels_due(schedule: Tuple[int, ...], t: int) -> list:
  """CMS levels l >= 1 that receive level l-1 after chunk t (0-based): ``(t + 1) % C_l == 0``,
  fastest first, so a slow level also receives what its faster neighbour just got."""
  return [l for l in range(1, len(schedule)) if (t + 1) % schedule[l] == 0]
