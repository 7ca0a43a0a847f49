"""How good the reasoning experiment's privileged teacher is: the base model reading a problem's
worked reference solution (what OPSD's and Sleep's teacher reads) against the base closed-book,
on each chunk's training problems (greedy, the checker).

    python scripts/reasoning_teacher.py [--variant replay]
"""

import argparse
import tempfile

import numpy as np

from sleep_jax.configs import reasoning
from sleep_jax.eval import answers
from sleep_jax.model import transformer
from sleep_jax.tasks import models, reasoning as task


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="default")
  c = reasoning.get_config(p.parse_args().variant)
  with tempfile.TemporaryDirectory() as work:
    model = models.load(c, work, log=lambda *_: None)
  setup = task.setup(c, model)
  mask = transformer.slot_mask_none(model.cfg)
  for level, chunk in zip(c.data.arith.levels, setup.chunks):
    docs = [d for d in chunk if d.train_questions]
    scores = {}
    for name, in_context in (("reading the worked solution", True), ("closed-book", False)):
      _, _, sc = answers.answer(setup, setup.params, mask, docs, c.eval, in_context=in_context,
                                train=True)
      scores[name] = 100 * float(np.mean(sc[c.eval.metric]))
    print(f"level {level}, {len(docs)} training problems: "
          + ", ".join(f"{k} {v:.1f}%" for k, v in scores.items()), flush=True)


if __name__ == "__main__":
  main()
