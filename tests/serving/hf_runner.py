"""Runs inside a venv with another transformers release (imports neither hc_retrofit nor the tests).

``python hf_runner.py JOBS.json``: for each job ``{"dir", "ids"}``, loads the checkpoint as a user
does (``AutoModelForCausalLM`` and ``AutoModel``, ``trust_remote_code=True``) and prints one
``RESULT {json}`` line: the transformers version, the logits for ``ids``, the base model's hidden
states, and the modules loaded from ``hc_retrofit`` (none: the checkpoint's code must be enough).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(jobs_file: str) -> None:
    import torch
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    for job in json.loads(Path(jobs_file).read_text(encoding="utf-8")):
        ids = torch.tensor(job["ids"])
        with torch.no_grad():
            lm = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=True, dtype=torch.float32).eval()
            base = AutoModel.from_pretrained(job["dir"], trust_remote_code=True, dtype=torch.float32).eval()
            result = {
                "dir": job["dir"],
                "version": transformers.__version__,
                "logits": lm(ids).logits.tolist(),
                "hidden": base(ids).last_hidden_state.tolist(),
                "hc_retrofit_modules": sorted(m for m in sys.modules if m.split(".")[0] == "hc_retrofit"),
            }
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
