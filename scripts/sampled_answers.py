"""Why a learner's sampled score (avg@k) can fall while its greedy score rises: the final
model of a finished reasoning run, on every level's held-out problems, greedy and sampled at
``eval.temperature``, with the entropy of its next-token distribution along its own greedy
answer and what the wrong samples look like.

    python scripts/sampled_answers.py --workdir DIR --variant verified --seed 0 \
        --methods base,sft_questions,opsd,sleep_no_dream,sleep_no_expansion

DIR is a finished ``reasoning.py:VARIANT`` workdir (``base`` needs no run there). The models are
scored under the config the first listed run recorded (``config.json``: the variant with the
run's ``--config.*`` overrides), so a reduced run is scored on its own held-out problems.
"""

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.configs import reasoning
from sleep_jax.eval import answers
from sleep_jax.model import sampler, transformer
from sleep_jax.parallel import checkpoint as ckpt_lib
from sleep_jax.sleep import dream_phase, dreaming, methods, run_records
from sleep_jax.tasks import models, reasoning as task


def recorded(config, workdir: str, method_names, seed: int):
  """``config`` with every key the listed runs in ``workdir`` recorded (they must agree)."""
  paths = [os.path.join(run_records.run_dir(workdir, m, seed), run_records.CONFIG_FILE)
           for m in method_names]
  paths = [p for p in paths if os.path.exists(p)]
  if not paths:
    print(f"no recorded config for seed {seed} in {workdir}: the variant's defaults", flush=True)
    return config
  if any(run_records.recorded_config(p) != run_records.recorded_config(paths[0])
         for p in paths[1:]):
    raise SystemExit(f"the runs {paths} recorded different configs: score them one at a time")
  with open(paths[0]) as f:
    flat = json.load(f)
  flat.pop("random_numbers", None)  # the draw scheme: recorded beside the config, not a key
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    if isinstance(value, list):  # JSON keeps no tuples
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if node[leaf] != value:
      with node.ignore_type():
        node[leaf] = value
  return config


def final_arrays(workdir: str, method: str, seed: int, setup, config):
  """(params, slot_mask) of the run's newest checkpoint (its final state once it finished)."""
  if method == "base":
    return setup.params, transformer.slot_mask_none(setup.cfg)
  fresh = {"params": setup.params, "slot_mask": transformer.slot_mask_none(setup.cfg)}
  if dream_phase.uses_generator(methods.get(method)):  # the checkpoint holds it too: its shapes
    r = config.dreaming.rest_em
    g = dreaming.init_generator(jax.random.key(0), setup.cfg, r.rank, r.alpha, r.targets,
                                r.optimizer)
    fresh["generator"] = {"lora": g.lora, "opt_state": g.opt_state}
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "runs", method, f"seed_{seed}", "ckpt"))
  try:
    st = ck.restore(fresh).state
  finally:
    ck.close()
  return st["params"], st["slot_mask"]


def greedy_entropy(setup, params, mask, prompts, comps, batch: int = 32) -> np.ndarray:
  """Mean entropy (nats) of p(. | prefix) over the tokens of each greedy completion."""
  rows = [list(p) + list(c) for p, c in zip(prompts, comps)]
  width = -(-max(len(r) for r in rows) // 16) * 16
  toks, valid = sampler.left_pad(rows, setup.tok.pad_id, width)

  @jax.jit
  def entropy(params, toks, valid):  # one compile: every batch has the same shape
    logits = transformer.apply(params, toks, setup.cfg, valid=valid, slot_mask=mask)[0]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -(jnp.exp(lp) * lp).sum(-1)  # (B, T): the entropy of the token after position t

  ent = []
  for i in range(0, len(rows), batch):
    t, v = toks[i:i + batch], valid[i:i + batch]
    n = len(t)
    t = np.concatenate([t, np.repeat(t[-1:], batch - n, 0)])
    v = np.concatenate([v, np.repeat(v[-1:], batch - n, 0)])
    ent.append(np.asarray(entropy(params, jnp.asarray(t), jnp.asarray(v)))[:n])
  ent = np.concatenate(ent)
  # Row r ends with its completion (left padding): positions width-len(c)-1 .. width-2 score it.
  return np.asarray([ent[r, width - len(c) - 1:width - 1].mean() if len(c) else 0.0
                     for r, c in enumerate(comps)])


def teacher_line(setup, config) -> str:
  """The consolidation's teacher (the base reading each training problem's worked solution)
  and the base closed-book, on every chunk's training problems: greedy accuracy and entropy."""
  docs = [d for ch in setup.chunks for d in ch if d.train_questions]
  mask = transformer.slot_mask_none(setup.cfg)
  out = []
  for name, in_context in (("teacher (worked solution in context)", True),
                           ("base closed-book", False)):
    _, comps, sc = answers.answer(setup, setup.params, mask, docs, config.eval,
                                  in_context=in_context, train=True)
    fmt = setup.fmt
    prompts = [fmt.with_context(d.passage, q.q) if in_context else fmt.closed_book(q.q)
               for d in docs for q in d.train_questions]
    ent = greedy_entropy(setup, setup.params, mask, prompts, comps)
    out.append(f"{name}: greedy {100 * np.mean(sc[config.eval.metric]):.1f}%, entropy along "
               f"its greedy answer {ent.mean():.3f} nats/token")
  return f"training problems ({len(comps)}): " + "; ".join(out)


def main() -> None:
  a = argparse.ArgumentParser()
  a.add_argument("--workdir", required=True)
  a.add_argument("--variant", default="verified")
  a.add_argument("--seed", type=int, default=0)
  a.add_argument("--methods", default="base,sleep_no_dream")
  a.add_argument("--show", type=int, default=2, help="wrong samples printed per method")
  a.add_argument("--teacher", action="store_true", help="also measure the teacher")
  a.add_argument("--samples", type=int, default=0,
                 help="k of avg@k (default: the run's eval.samples, 8 where that is 0)")
  args = a.parse_args()
  names = args.methods.split(",")
  c = recorded(reasoning.get_config(args.variant), args.workdir, names, args.seed)
  with tempfile.TemporaryDirectory() as work:
    setup = task.setup(c, models.load(c, work, log=lambda *_: None))
  if args.teacher:
    print(teacher_line(setup, c), flush=True)
  k = args.samples or int(c.eval.samples) or 8
  docs = [d for ch in setup.chunks for d in ch if d.eval_questions]
  base_right = None
  for method in names:
    params, mask = final_arrays(args.workdir, method, args.seed, setup, c)
    recs, comps, sc = answers.answer(setup, params, mask, docs, c.eval, in_context=False)
    prompts = [setup.fmt.closed_book(q.q) for d in docs for q in d.eval_questions]
    ent = greedy_entropy(setup, params, mask, prompts, comps)
    right = np.asarray(sc[c.eval.metric], bool)
    srecs, scomps, ssc = answers.answer(setup, params, mask, docs, c.eval, in_context=False,
                                        key=jax.random.key(args.seed), repeat=k)
    s_right = np.asarray(ssc[c.eval.metric], float).reshape(-1, k)
    full = np.asarray([len(t) >= int(c.eval.max_new_tokens) for t in scomps]).reshape(-1, k)
    has_answer = np.asarray(["Answer:" in r["pred"] for r in srecs]).reshape(-1, k)
    if method == "base":
      base_right = right
    on_base = "" if base_right is None else (
        f"; on the base's greedy-right problems: greedy {100 * right[base_right].mean():.1f}%, "
        f"sampled {100 * s_right[base_right].mean():.1f}%, entropy {ent[base_right].mean():.3f}")
    print(f"{method}: greedy {100 * right.mean():.1f}%, avg@{k} {100 * s_right.mean():.1f}%; "
          f"greedy-right problems sampled right {100 * s_right[right].mean():.1f}%, "
          f"greedy-wrong {100 * s_right[~right].mean():.1f}%; entropy along the greedy answer "
          f"{ent.mean():.3f} nats/token (greedy-right {ent[right].mean():.3f}, wrong "
          f"{ent[~right].mean():.3f}){on_base}; samples without 'Answer:' "
          f"{100 * (~has_answer).mean():.1f}%, cut at max_new_tokens {100 * full.mean():.1f}%",
          flush=True)
    shown = 0
    for i in np.flatnonzero(right):
      for j in np.flatnonzero(s_right[i] == 0)[:1]:
        if shown < args.show:
          print(f"    {recs[i]['q']!r}\n      greedy:  {recs[i]['pred']!r}\n"
                f"      sampled: {srecs[i * k + j]['pred']!r}")
          shown += 1


if __name__ == "__main__":
  main()
