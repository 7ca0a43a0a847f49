"""ml_collections configs, the override-key checker, and the absl entry point's errors."""

import os
import subprocess
import sys

import pytest

from sleep_jax import main
from sleep_jax.configs import default, loader
from sleep_jax.model.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(REPO, "sleep_jax", "configs", "default.py")


@pytest.mark.parametrize("variant", sorted(default.VARIANTS))
def test_variants_build_a_model_config(variant):
  c = default.get_config(variant)
  cfg = ModelConfig.from_config(c.model)
  assert cfg.n_levels == len(cfg.chunk_sizes)
  assert c.job in main.JOBS
  with pytest.raises(AttributeError):
    c.train.not_a_key = 1  # locked: no new keys by accident


def test_variants_differ_and_file_spec_loads():
  tiny, test = default.get_config("tiny"), default.get_config("test")
  assert tiny.model.d_model != test.model.d_model
  assert loader.load_config(f"{DEFAULT}:test").to_dict() == test.to_dict()
  assert loader.load_config(DEFAULT).to_dict() == default.get_config().to_dict()


def test_unknown_variant_suggests_nearest():
  with pytest.raises(ValueError, match=r"unknown config variant 'tinny'.*'tiny'"):
    default.get_config("tinny")


def test_mistyped_key_names_the_key_and_nearest_valid_ones():
  c = default.get_config("test")
  with pytest.raises(loader.ConfigKeyError) as e:
    loader.check_key(c, "train.stpes")
  msg = str(e.value)
  assert "'train.stpes'" in msg and "train.steps" in msg and "log_every" in msg
  with pytest.raises(loader.ConfigKeyError, match=r"'optimiser' .*Did you mean: optimizer"):
    loader.check_key(c, "optimiser.lr")
  with pytest.raises(loader.ConfigKeyError, match="model.d_model"):
    loader.check_key(c, "model.d_modle")
  with pytest.raises(loader.ConfigKeyError, match="is a value"):
    loader.check_key(c, "seed.x")
  loader.check_key(c, "model.chunk_sizes")  # valid keys pass


def test_overrides_parse_by_type_and_follow_references():
  c = default.get_config("test")
  loader.apply_overrides(c, ["train.steps=17", "optimizer.lr=1", "checkpoint.async_save=false",
                             "data.mode=pad", "model.chunk_sizes=[4, 1]"])
  assert c.train.steps == 17 and c.optimizer.decay_steps == 17  # a FieldReference
  assert c.optimizer.lr == 1.0 and isinstance(c.optimizer.lr, float)
  assert c.checkpoint.async_save is False and c.data.mode == "pad"
  assert ModelConfig.from_config(c.model).chunk_sizes == (4, 1)
  with pytest.raises(loader.ConfigKeyError):
    loader.apply_overrides(c, ["train.setps=3"])


def test_argv_overrides_are_found():
  spec, ov = loader.overrides_from_argv(
      ["prog", "--config", "f.py:tiny", "--config.train.steps=3", "--config.seed", "4",
       "--workdir=/x", "--noconfig.checkpoint.async_save"])
  assert spec == "f.py:tiny"
  assert ov == [("train.steps", "3"), ("seed", "4"), ("checkpoint.async_save", None)]


def test_main_rejects_mistyped_key_with_suggestion(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "sleep_jax.main", f"--config={DEFAULT}:test",
       f"--workdir={tmp_path}", "--config.train.stpes=3"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2
  assert "unknown config key 'train.stpes'" in proc.stderr
  assert "Did you mean: train.steps" in proc.stderr
  assert not os.listdir(tmp_path)  # nothing ran


def test_unknown_job_is_a_user_error():
  from sleep_jax.errors import UserError
  with pytest.raises(UserError, match="train_lm"):
    main.resolve_job("train_llm")


def test_task_sources_name_their_tasks():
  from sleep_jax import tasks
  from sleep_jax.errors import UserError
  for source in tasks.SOURCES:
    assert tasks.get(source).name == source
  with pytest.raises(UserError, match="Did you mean 'world'"):
    tasks.check_source("wrld")


# Every config file, every listed variant, the help text and the config check, in a fresh
# process: the modules of the jax stack it imported (none, so a bad config fails fast).
_JAX_FREE = """
import os, sys
from sleep_jax import main
from sleep_jax.configs import loader
from sleep_jax.sleep import validate
main.help_text()
here = os.path.join("sleep_jax", "configs")
for name in sorted(os.listdir(here)):
  if name.endswith(".py") and name not in ("__init__.py", "loader.py"):
    module = loader.load_module(os.path.join(here, name))
    for variant in getattr(module, "HELP", {}):
      module.get_config(variant)
validate.check(loader.load_module(os.path.join(here, "knowledge.py")).get_config("test"))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "optax", "orbax")))
"""


def test_config_files_and_the_config_check_import_no_jax():
  p = subprocess.run([sys.executable, "-c", _JAX_FREE], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip() == "[]"
