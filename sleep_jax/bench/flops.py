"""FLOP accounting (analytic, MaxText convention) and XLA's own count of a compiled program."""


from typing import Dict, Optional




# ----------------------------------------------------------------------------------------------
# FLOP and byte accounting.
# ----------------------------------------------------------------------------------------------
def matmul_params(cfg, *, executed: bool = False) -> Dict[str, int]:
  """Parameters that enter a matmul, per token (the ``N`` of ``6 N D``).

  ``executed=False`` counts the model's function (MaxText/PaLM convention): attention
  projections, the routed (``expert_top_k``) dense experts, the unembedding, and the low-rank
  slots that are live (none in these benchmarks: every slot is masked). ``executed=True`` also
  counts every dense expert (routing computes them all) and, under ``masked_slots``, every slot:
  the size of the slot matmuls, which the model skips in a level with no live slot.
  """
  d, L, H, K, hd = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hd
  attn = d * H * hd + 2 * d * K * hd + H * hd * d
  mlp = slots = 0
  for j in range(cfg.n_levels):
    F, E = cfg.d_ff[j], cfg.n_experts[j]
    if F > 0:
      active = E if (executed or E == 1) else min(cfg.expert_top_k, E)
      mlp += active * 3 * d * F + (d * E if E > 1 else 0)
    if cfg.n_slots > 0 and executed:
      slots += cfg.n_slots * (2 * d * cfg.slot_rank) + d * cfg.n_slots
  head = d * cfg.vocab_size
  return {"attention": L * attn, "mlp": L * mlp, "masked_slots": L * slots, "lm_head": head,
          "total": L * (attn + mlp + slots) + head}


TRAIN_FLOPS_FORMULA = (
    "flops/step = 6 * N * B * T + 6 * L * H * hd * B * T^2, N = matmul params per token "
    "(attention q,k,v,o + routed dense MLP experts + lm_head d*V; embedding lookup and norms "
    "excluded; masked low-rank slots excluded), the second term is causal attention "
    "(QK^T and PV, 4 B T^2 H hd per layer forward, halved for causality, x3 for fwd+bwd) "
    "[MaxText calculate_tflops_training_per_device convention]")


def train_flops(cfg, batch: int, seq: int) -> Dict[str, float]:
  n = matmul_params(cfg)["total"]
  executed = matmul_params(cfg, executed=True)
  n_exec = executed["total"] - executed["masked_slots"]  # every slot is masked in the benches
  tokens = batch * seq
  attn = 6 * cfg.n_layers * cfg.n_heads * cfg.hd * batch * seq ** 2
  return {"matmul_params": n, "tokens": tokens, "dense_flops": 6 * n * tokens,
          "attention_flops": attn, "model_flops": 6 * n * tokens + attn,
          # What the code executes: every dense expert, no masked slot, and attention on the
          # full T x T square (the causal mask is applied after the product).
          "executed_flops_estimate": 6 * n_exec * tokens + 2 * attn}


def _cost_flops(compiled) -> Optional[float]:
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0]
    return float(ca.get("flops")) if ca and "flops" in ca else None
  except Exception:
    return None
