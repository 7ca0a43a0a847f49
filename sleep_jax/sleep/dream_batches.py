"""Dream batches in the sampler's layout and how they are sampled (docs/method.md section 4 step 1).

Layout (exactly the sampler's): ``tokens``/``valid``/``completion_mask`` of shape (n, P + N),
left-padded prompt then completion; ``tokens[:, t]`` is scored by ``logits[:, t - 1]``.
"""

from __future__ import annotations

import dataclasses
from typing import List, Mapping, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sleep_jax.model import sampler
from sleep_jax.model.config import ModelConfig
from sleep_jax.sleep.dreaming_config import DEFAULT_TEMPLATES


@dataclasses.dataclass(frozen=True)
class DreamTemplates:
  """Prompt templates applied to a context C: ``text_j = templates[j].format(context=C)``.

  >>> t = DreamTemplates({"qa": "{context} Q:"})
  >>> t.format("Ann was born in Oslo.")
  [('qa', 'Ann was born in Oslo. Q:')]
  """

  templates: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TEMPLATES))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "DreamTemplates":
    t = config.templates
    return cls(dict(t.to_dict() if isinstance(t, ml_collections.ConfigDict) else t))

  def format(self, context: str) -> List[Tuple[str, str]]:
    """[(template name, formatted text)] in template order."""
    return [(name, tpl.format(context=context)) for name, tpl in self.templates.items()]

  def prompts(self, tokenizer, contexts: Sequence[str], add_bos: bool = True
              ) -> Tuple[List[List[int]], List[Tuple[int, str]]]:
    """Token lists for every (context, template) pair and their ``(context index, name)`` tags.

    ``tokenizer`` needs ``encode(text, add_bos=...) -> list[int]``.
    """
    ids, tags = [], []
    for ci, ctx in enumerate(contexts):
      for name, text in self.format(ctx):
        ids.append(list(tokenizer.encode(text, add_bos=add_bos)))
        tags.append((ci, name))
    return ids, tags



class Dreams(NamedTuple):
  """A batch of dreams in the sampler's layout (n, P + N)."""
  tokens: jax.Array
  valid: jax.Array
  completion_mask: jax.Array


def as_dreams(x) -> Dreams:
  """``SampleOutput`` / ``Dreams`` / mapping with tokens, valid, completion_mask -> ``Dreams``."""
  if isinstance(x, Mapping):
    return Dreams(x["tokens"], x["valid"], x["completion_mask"])
  return Dreams(x.tokens, x.valid, x.completion_mask)


def fixed_dreams(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                 pad_id: int = 0) -> Dreams:
  """Host helper: given (not sampled) dreams in the sampler's layout, prompt ``i`` left-padded to
  the longest prompt, then completion ``i`` (right-padded). Used for candidate dreams that come
  from elsewhere than the generator, e.g. ARC task variants (``dream(candidates=...)``)."""
  P = max(len(p) for p in prompts)
  N = max(len(c) for c in completions)
  toks = np.full((len(prompts), P + N), pad_id, np.int32)
  valid = np.zeros(toks.shape, bool)
  cm = np.zeros(toks.shape, bool)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    toks[i, P - len(p):P], valid[i, P - len(p):P] = p, True
    toks[i, P:P + len(c)], valid[i, P:P + len(c)], cm[i, P:P + len(c)] = c, True, True
  return Dreams(jnp.asarray(toks), jnp.asarray(valid), jnp.asarray(cm))


def concat_dreams(a: Dreams, b: Dreams, pad_id: int = 0) -> Dreams:
  """Rows of ``a`` then ``b``, right-padded to a common width (positions are
  ``cumsum(valid) - 1``, so right padding changes no likelihood)."""
  w = max(a.tokens.shape[1], b.tokens.shape[1])
  pad = lambda x, v: jnp.pad(x, ((0, 0), (0, w - x.shape[1])), constant_values=v)
  return Dreams(jnp.concatenate([pad(a.tokens, pad_id), pad(b.tokens, pad_id)]),
                jnp.concatenate([pad(a.valid, False), pad(b.valid, False)]),
                jnp.concatenate([pad(a.completion_mask, False), pad(b.completion_mask, False)]))



def take(dreams: Dreams, idx) -> Dreams:
  """Rows ``idx`` of a dream batch."""
  return Dreams(*(jnp.asarray(x)[idx] for x in dreams))


def prompt_batch(context_prompts, m: int, pad_id: int = 0):
  """Host helper: ``m`` rows of left-padded prompts, row i = prompt ``i mod P``.

  ``context_prompts`` is a list of token lists or a ``(tokens, valid)`` pair of (P, L) arrays.
  Returns ``(tokens, valid, prompt_index)``.
  """
  if isinstance(context_prompts, tuple) and len(context_prompts) == 2 and hasattr(
      context_prompts[0], "shape"):
    toks, valid = (np.asarray(a) for a in context_prompts)
  else:
    toks, valid = sampler.left_pad(context_prompts, pad_id=pad_id)
  idx = np.arange(m) % toks.shape[0]
  return jnp.asarray(toks[idx]), jnp.asarray(valid[idx]), idx


def sample_dreams(params, cfg: ModelConfig, slot_mask, context_prompts, rng, m: int,
                  max_new_tokens: int, temperature: float = 1.0, random_expert: bool = True,
                  gen_lora=None, *, gen_lora_scale: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_id: int = 0,
                  copy=None) -> sampler.SampleOutput:
  """``m`` dreams ``d_i ~ LM_gen(. | prompt_{i mod P})`` with the one sampler.

  ``LM_gen`` is ``params`` plus ``gen_lora`` (scaled by ``gen_lora_scale``) when given. With
  ``random_expert`` every CMS router also turns on one uniformly random live, unselected expert
  (and slot) per token (``sampler.sample(random_expert=True)`` -> ``transformer.apply(route_rng)``).
  ``copy``: ``(spans (P, K), lengths (P,), trigger (V,))`` per context prompt, the sampler's
  entity copying (``sampler.sample(copy_span=...)``); None: plain sampling.
  Returns the sampler's ``SampleOutput`` (m, P + N).
  """
  toks, valid, idx = prompt_batch(context_prompts, m, pad_id)
  kw = {}
  if copy is not None:
    spans, lens, trigger = copy
    kw = dict(copy_span=jnp.asarray(np.asarray(spans)[idx], jnp.int32),
              copy_len=jnp.asarray(np.asarray(lens)[idx], jnp.int32),
              copy_trigger=jnp.asarray(trigger, bool))
  return sampler.sample(params, toks, valid, rng, cfg=cfg, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p,
                        stop_tokens=tuple(stop_tokens), pad_id=pad_id, slot_mask=slot_mask,
                        lora=gen_lora, lora_scale=gen_lora_scale, random_expert=random_expert,
                        **kw)


