"""GKD mixing, the Knowledge Seeding objective, and the registry."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax import losses as L
from sleep_jax.model.sampler import SampleOutput
from sleep_jax.model.transformer import logits_to_logprobs

B, T, V = 4, 7, 9


def _logits(seed, shape=(B, T, V)):
  return 2 * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _mask(seed):
  m = np.random.default_rng(seed).random((B, T)) < 0.7
  m[:, 0] = True
  return m


def test_gkd_loss_weighs_the_two_sources():
  d = L.DistillBatch(_logits(0), _logits(1), _mask(2))
  s = L.DistillBatch(_logits(3), _logits(4), _mask(5))
  f = lambda b: L.divergence_loss(*b, divergence="jsd", beta=0.3)[0]
  for lam in (0.0, 0.25, 1.0):
    loss, met = L.gkd_loss(d, s, lam=lam, divergence="jsd", beta=0.3)
    np.testing.assert_allclose(loss, (1 - lam) * f(d) + lam * f(s), rtol=1e-6)
    np.testing.assert_allclose(met["divergence_student_data"], f(s), rtol=1e-6)
  # A source with weight 0 may be skipped; with weight > 0 it may not.
  np.testing.assert_allclose(L.gkd_loss(d, None, lam=0.0)[0], L.gkd_loss(d, s, lam=0.0)[0])
  with pytest.raises(ValueError, match="student_data"):
    L.gkd_loss(d, None, lam=0.5)
  # No gradient to the teacher logits.
  g = jax.grad(lambda t: L.gkd_loss(L.DistillBatch(d[0], t, d[2]), s, lam=0.5)[0])(d[1])
  assert np.all(np.asarray(g) == 0)


def test_gkd_sources_and_row_selection():
  use = L.gkd_sources(jax.random.PRNGKey(0), 0.3, 20_000)
  assert abs(float(use.mean()) - 0.3) < 0.02
  keys = jax.random.split(jax.random.PRNGKey(1), 400)
  step = np.asarray(jax.vmap(lambda k: L.gkd_sources(k, 0.3, 8, per_example=False))(keys))
  assert np.all(step == step[:, :1])  # per step: the whole batch from one source
  assert abs(step[:, 0].mean() - 0.3) < 0.08
  z = jnp.zeros((3, 4), jnp.int32)
  t = SampleOutput(z, z.astype(bool), z.astype(bool), z.astype(jnp.float32))
  s = SampleOutput(z + 1, ~z.astype(bool), ~z.astype(bool), z + 1.0)
  mixed = L.select_rows(jnp.array([True, False, True]), t, s)
  assert np.asarray(mixed.tokens)[:, 0].tolist() == [1, 0, 1]
  assert np.asarray(mixed.valid)[:, 0].tolist() == [True, False, True]


def test_gkd_mixed_loss_is_pooled_token_mean_with_source_metrics():
  s, t, m = _logits(6), _logits(7), _mask(8)
  from_s = np.array([True, False, False, True])
  loss, met = L.gkd_mixed_loss(s, t, m, from_s, divergence="fkl")
  np.testing.assert_allclose(loss, L.divergence_loss(s, t, m, divergence="fkl")[0], rtol=1e-6)
  ms = m & from_s[:, None]
  np.testing.assert_allclose(met["divergence_student_data"],
                             L.divergence_loss(s, t, ms, divergence="fkl")[0], rtol=1e-6)


def _ks_batch(seed, cfg, params):
  """A consolidation batch as ``seed_knowledge`` builds it: student sequences (prompt Ps +
  completion N) of both sides, the teacher's logits on the completion window, rewards."""
  from sleep_jax.model import transformer as T
  rng = np.random.default_rng(seed)
  b, ps, n, v = 3, 5, 4, cfg.vocab_size
  live = jnp.asarray(np.arange(n)[None, :] < np.array([[4], [2], [3]]))  # rows end early
  batch = {"slot_mask": T.slot_mask_none(cfg)}
  for side in ("off", "on"):
    comp = jnp.asarray(rng.integers(3, v, (b, n)), jnp.int32)
    batch[f"{side}_tokens"] = jnp.concatenate(
        [jnp.asarray(rng.integers(3, v, (b, ps)), jnp.int32), comp], 1)
    batch[f"{side}_valid"] = jnp.concatenate([jnp.ones((b, ps), bool), live], 1)
    batch[f"{side}_completion_mask"] = jnp.concatenate([jnp.zeros((b, ps), bool), live], 1)
    batch[f"{side}_teacher_logits"] = jnp.asarray(_logits(seed + 1, (b, n + 1, v)))
  batch["on_rewards"] = jnp.asarray([1.0, 0.0, 0.5], jnp.float32)
  return batch, ps


def test_knowledge_seeding_endpoints_and_mix():
  """alpha = 1: the GKD mix of the two sides' divergences; alpha = 0: the imitation policy
  gradient; in between, the gradient is the alpha-mix of the two."""
  from sleep_jax.model import config, transformer as T
  cfg = config.tiny(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=(0, 32),
                    n_experts=(1, 1), n_slots=1, slot_rank=4, chunk_sizes=(1, 1))
  params = T.init(jax.random.key(0), cfg)
  batch, ps = _ks_batch(10, cfg, params)

  def student(p, side):
    logits = T.apply(p, batch[f"{side}_tokens"], cfg, valid=batch[f"{side}_valid"],
                     slot_mask=batch["slot_mask"], logits_from=ps - 1)[0]
    return logits, L.prediction_mask(batch[f"{side}_completion_mask"])[:, ps - 1:]

  def div(p, side):
    s, m = student(p, side)
    return L.divergence_loss(s, batch[f"{side}_teacher_logits"], m, divergence="jsd",
                             beta=0.5)[0]

  def pg(p):
    s, m = student(p, "on")
    lp = logits_to_logprobs(L.sanitize(s, m), batch["on_tokens"][:, ps - 1:])
    r = batch["on_rewards"]
    return L.pg_loss(lp, batch["on_completion_mask"][:, ps - 1:], r - r.mean())[0]

  ks = lambda p, a, lam: L.knowledge_seeding_loss(
      p, batch, None, cfg=cfg, alpha=a, lam=lam, divergence="jsd",
      divergence_kwargs={"beta": 0.5})[0]
  lam = 0.25
  gkd = lambda p: (1 - lam) * div(p, "off") + lam * div(p, "on")
  # Jitted: op-by-op dispatch of the model's forward and backward is what makes this test slow.
  both = jax.jit(lambda p: (ks(p, 1.0, lam), gkd(p), ks(p, 0.0, lam), pg(p)))
  k1, g1, k0, p0 = both(params)
  np.testing.assert_allclose(k1, g1, rtol=1e-5)
  np.testing.assert_allclose(k0, p0, rtol=1e-5, atol=1e-7)
  a = 0.3
  g, g_pg, g_div = jax.jit(lambda p: (jax.grad(lambda q: ks(q, a, lam))(p), jax.grad(pg)(p),
                                      jax.grad(gkd)(p)))(params)
  jax.tree.map(lambda x, y, z: np.testing.assert_allclose(x, (1 - a) * y + a * z, rtol=1e-4,
                                                          atol=1e-6), g, g_pg, g_div)
  assert L.get_loss("ks") is L.knowledge_seeding_loss


def test_registry_lookup_errors_and_extension():
  assert L.get_divergence("jsd") is L.generalized_jsd
  assert L.get_loss("grpo") is L.grpo_loss
  assert L.get_advantage("grpo") is L.group_advantages
  assert L.get_reward("lev") is L.lev_rewards
  with pytest.raises(ValueError, match=r"unknown divergence 'jds'\. Did you mean 'jsd'.*fkl"):
    L.get_divergence("jds")
  with pytest.raises(ValueError, match="Valid loss names: .*grpo.*rest_em"):
    L.get_loss("nope")
  with pytest.raises(ValueError, match="already registered"):
    L.register_divergence("fkl")(lambda s, t: 0.0)
  with pytest.raises(ValueError, match="no hyper-parameter.*clip_eps"):
    L.build_loss("ppo", clip_epsilon=0.2)
  assert L.build_loss("ppo", clip_eps=0.1).keywords == {"clip_eps": 0.1}

  # A new divergence is one decorated function and is then usable by name from any loss.
  if "test_sq_hellinger" not in L.DIVERGENCES:
    @L.register_divergence("test_sq_hellinger")
    def sq_hellinger(student_logp, teacher_logp):
      """H^2 = 1 - sum_v sqrt(P_v Q_v)."""
      return 1.0 - jnp.sum(jnp.exp(0.5 * (student_logp + teacher_logp)), axis=-1)

  s, t, m = _logits(30), _logits(31), _mask(32)
  loss = L.divergence_loss(s, t, m, divergence="test_sq_hellinger")[0]
  p, q = jax.nn.softmax(t), jax.nn.softmax(s)
  want = ((1 - np.sqrt(p * q).sum(-1)) * m).sum() / m.sum()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  d = L.DistillBatch(s, t, m)
  np.testing.assert_allclose(L.gkd_loss(d, d, lam=0.5, divergence="test_sq_hellinger")[0], want,
                             rtol=1e-5)


def test_losses_are_jittable_with_config_hyperparameters():
  s, t, m = _logits(40), _logits(41), _mask(42)
  lp, ids = L.teacher_topk(t, 3)
  d = L.DistillBatch(s, t, m)
  cases = [
      (L.build_loss("distill", divergence="skew_rkl", alpha=0.2, temperature=2.0), (s, t, m)),
      (L.build_loss("topk_distill", divergence="jsd", beta=0.2), (s, lp, ids, m)),
      (L.build_loss("gkd", lam=0.5, divergence="rkl"), (d, d)),
      (L.build_loss("gkd_mixed", divergence="tv"), (s, t, m, np.array([1, 0, 1, 0], bool))),
  ]
  for fn, args in cases:
    eager = fn(*args)
    jitted = jax.jit(fn)(*args)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-5)
    assert set(jitted[1]) == set(eager[1]) and "loss" in eager[1]


def test_gate_loss_matches_numpy_and_the_model_returns_its_gates():
  """G = mean BCE(gate, y) over answer positions and new slots, as in NumPy; the gates the model
  returns are sigmoid(w . x) of each level, and asking for them changes no logit."""
  from sleep_jax.losses.objectives import gate_loss
  from sleep_jax.model import config, transformer as T
  rng = np.random.default_rng(0)
  g = rng.uniform(0.05, 0.95, (2, 3, 4, 2)).astype(np.float32)  # (L, B, T, S)
  mask = rng.uniform(size=(3, 4)) > 0.3
  y = np.array([1.0, 0.0, 1.0], np.float32)
  slots = np.array([[False, True]])
  loss, m = gate_loss({0: jnp.asarray(g)}, jnp.asarray(mask), jnp.asarray(y), jnp.asarray(slots))
  s = g[..., 1]
  yy = np.broadcast_to(y[None, :, None], s.shape)
  w = np.broadcast_to(mask[None], s.shape)
  bce = -(yy * np.log(s + 1e-6) + (1 - yy) * np.log(1 - s + 1e-6))
  np.testing.assert_allclose(loss, bce[w].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["gate_on_anchor"], s[w & (yy == 0)].mean(), rtol=1e-5)
  cfg = config.tiny(vocab_size=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                    d_ff=(0, 32), n_experts=(1, 1), n_slots=2, slot_rank=4, chunk_sizes=(1, 1))
  params = T.init(jax.random.key(0), cfg)
  params["layers"]["cms_0"]["slot_router"] = jax.random.normal(
      jax.random.key(1), params["layers"]["cms_0"]["slot_router"].shape)
  tokens = jnp.asarray(rng.integers(0, 32, (2, 6)))
  plain, _ = T.apply(params, tokens, cfg, logits_from=2)
  logits, _, gates = T.apply(params, tokens, cfg, logits_from=2, return_gates=True)
  np.testing.assert_array_equal(plain, logits)
  assert set(gates) == {0, 1} and gates[0].shape == (2, 2, 6, 2)
  assert float(gates[0].min()) > 0.0 and float(gates[0].max()) < 1.0


@pytest.mark.parametrize("positions", ["answer", "anchor_all"])
def test_gate_term_positions(positions):
  """The gate term of the KS objective acts where ``gate_positions`` says: at the positions that
  predict the completion for every item, and with "anchor_all" at every real position of an
  anchor item (y = 0), so the new slot is shut over the whole unrelated input."""
  from sleep_jax.model import config, transformer as T
  cfg = config.tiny(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=(0, 32),
                    n_experts=(1, 1), n_slots=2, slot_rank=4, chunk_sizes=(1, 1))
  params = T.init(jax.random.key(0), cfg)
  params["layers"]["cms_0"]["slot_router"] = jax.random.normal(
      jax.random.key(1), params["layers"]["cms_0"]["slot_router"].shape)
  batch, ps = _ks_batch(12, cfg, params)
  del batch["on_tokens"]  # lam = 0: the off-policy side alone
  y = np.array([1.0, 0.0, 0.0], np.float32)
  slots = np.array([[False, True], [False, False]])
  batch.update(slot_mask=jnp.asarray([[True, True], [False, False]]),
               gate_target=jnp.asarray(y), gate_slots=jnp.asarray(slots))
  _, m = L.knowledge_seeding_loss(params, batch, None, cfg=cfg, alpha=1.0, lam=0.0,
                                  gate_weight=1.0, gate_positions=positions)
  _, _, gates = T.apply(params, batch["off_tokens"], cfg, valid=batch["off_valid"],
                        slot_mask=batch["slot_mask"], return_gates=True)
  s = np.asarray(gates[0])[..., 1]  # (L, B, T): the new slot
  pred = np.zeros(s.shape[1:], bool)
  pred[:, ps - 1:] = np.asarray(L.prediction_mask(batch["off_completion_mask"]))[:, ps - 1:]
  anchor_w = np.asarray(batch["off_valid"]) if positions == "anchor_all" else pred
  w_new, w_anchor = pred & (y[:, None] == 1), anchor_w & (y[:, None] == 0)
  np.testing.assert_allclose(m["gate_on_new"], s[:, w_new].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["gate_on_anchor"], s[:, w_anchor].mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="gate_positions"):
    L.knowledge_seeding_loss(params, batch, None, cfg=cfg, alpha=1.0, lam=0.0, gate_weight=1.0,
                             gate_positions="everywhere")
