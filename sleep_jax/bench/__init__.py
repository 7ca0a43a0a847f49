"""Performance benchmarks of the whole stack, in one process so that ratios are fair.

    python -m sleep_jax.bench --out bench.json                 # everything (~20 min on 2 cores)
    python -m sleep_jax.bench --only matmul_peak,train_step    # some parts
    python -m sleep_jax.bench --quick --only matmul_peak       # tiny sizes (smoke test)

Parts (``PARTS``), each a function ``part(ctx) -> dict`` recorded under ``parts.<name>``:

* ``matmul_peak``: best fp32 (and, on accelerators, bf16) GFLOP/s of large jitted matmuls: the
  ceiling every MFU below is measured against. Also the memory bandwidth (large jitted sum and
  copy) used by the sampler's bandwidth bound.
* ``train_step``: ``train.step.make_train_step`` + ``train.lm_loss`` (AdamW) at the
  SmolLM2-135M shape (random init) and at the tiny default shape; analytic FLOPs in the MaxText
  convention (formula in the JSON), tokens/s and MFU; a small sweep over remat x batch x sequence
  and a sub-part profile (forward, forward+backward, full step, LM head+loss alone) of the best.
* ``sampler``: ``model.sampler.sample`` greedy decode tokens/s at batch 1, 16, 64 on SmolLM2
  (the cached GGUF if present, else random weights), prefill separated from decode
  (``max_new_tokens=1`` vs ``N``); Hugging Face ``generate`` on the same GGUF and prompts when
  torch/transformers are installed (its own process, ``hf_peer.py``; the two sides alternate in
  rounds and a ratio counts only when both had >= 90% of the cores); at batch 1 the
  memory-bandwidth bound.
* ``sleep_step``: one consolidation step of Sleep at the SmolLM2-135M shape through
  ``consolidation.seed_knowledge``, part by part, against its lower bound from the measured
  roofs (``sleep_step.py``).
* ``on_policy_step``: one on-policy distillation iteration (student sample, teacher forward,
  student update through ``losses.objectives.knowledge_seeding_loss``) on the tiny model, timed per part, and
  ``consolidation.seed_knowledge``'s own per-step time for comparison; and at the real-ARC
  shape (SmolLM2-135M), the output head and loss over the completion window only vs over the
  whole sequence (``logits_window``: compiled memory and time of both, same run).
* ``dream_trials``: ``bench.sleep_parts.benchmark_trials`` (m vmapped LoRA trials vs one by one).
* ``sharding``: compiled per-device memory of a ~1B-parameter train step on 1 and 8 (fake)
  devices with FSDP (lower + compile only; the 8-device part runs in a subprocess).

On a GPU/TPU the train step runs in bfloat16 and MFU is also reported against the chip's
published dense bf16 peak (``PUBLISHED_PEAK_TFLOPS``).

Timing: every measurement is the best (minimum) of a few calls after a warm-up call that
compiles; the first call's time is reported separately. On a shared machine absolute times move
with the load; ratios measured in the same run are the meaningful figures.
"""

from sleep_jax.bench.cli import (PARTS, SCHEMA, main, parse_only, run,  # noqa: F401
                                 summary_markdown, targets)
from sleep_jax.bench.flops import matmul_params, train_flops  # noqa: F401
from sleep_jax.bench.harness import published_peak_tflops  # noqa: F401
