"""The ``transformers`` peer of the ``sampler`` bench part, in a process of its own.

Run by the bench (``python -m sleep_jax.bench.hf_peer GGUF``): loads the same GGUF weights in
``transformers`` (float32, 2 torch threads), then answers
one JSON request per stdin line, ``{"prompts": [[ids]], "n": N}``, with ``{"tokens": [[ids]]}``
after a greedy ``generate`` of exactly N new tokens. A process of its own keeps the two
runtimes' thread pools apart, and lets the bench count each side's CPU time."""

import json
import os
import sys


def main(path: str) -> None:
  os.environ.setdefault("TQDM_DISABLE", "1")
  import torch
  import transformers
  torch.set_num_threads(2)
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  model.eval()
  print(json.dumps({"ready": True, "transformers": transformers.__version__,
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()}),
        flush=True)
  for line in sys.stdin:
    req = json.loads(line)
    ids = torch.as_tensor(req["prompts"], dtype=torch.long)
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=req["n"], min_new_tokens=req["n"], do_sample=False,
                           pad_token_id=0, num_beams=1)
    print(json.dumps({"tokens": out[:, ids.shape[1]:].tolist()}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
