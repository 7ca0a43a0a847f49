"""Could a signal the model already has tell when the new slot should be on? After one sleep of
the ``written`` variant, two candidate signals computed with the new slots off (the model as it
woke up), on three populations: the new chunk's closed-book questions (where the slot must be
on), the retention probe's questions about people the base was trained on (where it should be
off) and in-context reading of unseen people (off):

1. the base's confidence in its first answer token (max softmax probability), and the routed
   accuracy of "answer with the base when it is at least this confident, else with the slept
   model" over thresholds (a router on that signal, with nothing learnt);
2. the base's surprisal of the person's last name given the first name in the question (is the
   name one the base has seen?).

    python -m sleep_jax.main --config=sleep_jax/configs/knowledge.py:written --workdir=W \\
      --config.world_chunks=1 --config.methods='("sleep",)'
    python experiments/knowledge_incorporation/probe_gate_signals.py W
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.configs import knowledge
from sleep_jax.data import world as world_lib
from sleep_jax.data import world_encode
from sleep_jax.model import transformer
from sleep_jax.parallel import checkpoint as ckpt_lib
from sleep_jax.sleep import cycle
from sleep_jax.tasks import make_setup, models


def slept_state(workdir: str, variant: str = "written", method: str = "sleep", seed: int = 0):
  """(config, setup, the sleep's final state) of a 1-chunk run in ``workdir``."""
  c = knowledge.get_config(variant)
  c.world_chunks = 1
  setup = make_setup(c, workdir, log=lambda *a: None)
  ctx = cycle.context(c, setup, method, seed)
  ck = ckpt_lib.Checkpointer(f"{workdir}/runs/{method}/seed_{seed}/ckpt", max_to_keep=2,
                             async_save=False)
  return c, setup, cycle.restored_state(cycle.fresh_state(ctx), ck)


def main(workdir: str) -> None:
  c, setup, st = slept_state(workdir)
  world = world_lib.World(models.base_recipe(c).world)
  tok, cfg = world.tokenizer, setup.cfg
  off = transformer.slot_mask_none(cfg)

  @jax.jit
  def forward(params, tokens, valid, loss_mask, mask):
    logits, _ = transformer.apply(params, tokens, cfg, valid=valid, slot_mask=mask)
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    first = jnp.argmax(loss_mask[:, 1:], axis=1)  # the position predicting the answer
    at = jnp.take_along_axis(lp, first[:, None, None], axis=1)[:, 0]
    right = jnp.argmax(at, -1) == jnp.take_along_axis(tokens[:, 1:], first[:, None], 1)[:, 0]
    surprisal = -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    return right, jnp.exp(at.max(-1)), surprisal

  people = {p.pid: p for p in world.people}

  def run(examples, mask):
    right, conf, names = [], [], []
    for i in range(0, len(examples), 128):
      chunk = list(examples[i:i + 128])
      n = len(chunk)
      chunk += [chunk[-1]] * (128 - n)
      b = world_encode.encode_batch(tok, chunk, 64)
      r, cf, s = (np.asarray(x) for x in forward(st.params, b["tokens"], b["valid"],
                                                  b["loss_mask"], mask))
      right.append(r[:n])
      conf.append(cf[:n])
      rows = np.asarray(b["tokens"])
      for k, e in enumerate(chunk[:n]):  # last name given the first name, last occurrence
        p = people[e.pid]
        first, last = tok.encode(p.first), tok.encode(" " + p.last)
        row, found = list(rows[k]), np.nan
        for j in range(len(row) - len(first) - len(last), -1, -1):
          if row[j:j + len(first)] == first and row[j + len(first):j + len(first) + len(last)] == last:
            found = float(s[k, j + len(first) - 1:j + len(first) - 1 + len(last)].sum())
            break
        names.append(found)
    return np.concatenate(right), np.concatenate(conf), np.array(names)

  n = int(c.eval.retention_people)
  sets = {"new people, closed-book": world.closed_book_set(world.chunk(0), "eval"),
          "old facts (QA population)": world.closed_book_set(world.population("qa")[:n], "eval"),
          "reading (in context)": world.in_context_set(world.population("heldout")[:n], "eval")}
  res = {}
  print("| population | base | slept | base confidence when right / wrong | last-name "
        "surprisal (nats) 25/50/75% |\n|---|---|---|---|---|")
  for name, examples in sets.items():
    base_ok, conf, surprisal = run(examples, off)
    slept_ok, _, _ = run(examples, st.slot_mask)
    res[name] = (base_ok, conf, slept_ok)
    q = np.nanpercentile(surprisal, [25, 50, 75])
    print(f"| {name} | {100 * base_ok.mean():.1f} | {100 * slept_ok.mean():.1f} | "
          f"{conf[base_ok].mean():.2f} / {conf[~base_ok].mean():.2f} | "
          f"{q[0]:.1f} / {q[1]:.1f} / {q[2]:.1f} |")
  print("\n| base when confidence >= | " + " | ".join(res) + " |\n|---|---|---|---|")
  for t in (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.01):
    cells = [f"{100 * np.where(conf >= t, b, s).mean():.1f} (base {100 * (conf >= t).mean():.0f}%)"
             for b, conf, s in res.values()]
    print(f"| {t:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main(sys.argv[1])
