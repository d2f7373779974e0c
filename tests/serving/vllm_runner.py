"""Runs inside the vLLM environment (its own python; imports neither hc_retrofit nor the tests).

``python vllm_runner.py generate JOBS.json``: for each job ``{"dir", "dtype", "eager", "prompts",
"max_tokens"}``, one ``vllm.LLM`` on the checkpoint exactly as a user builds it
(``model_impl="transformers", trust_remote_code=True``), greedy generation from token-id prompts;
prints one ``RESULT {json}`` line per job: the generated token ids and each one's logprob.

``python vllm_runner.py query BASE_URL MODEL PROMPTS.json MAX_TOKENS``: the same greedy requests to
a running ``vllm serve`` through the ``openai`` client; prints ``RESULT {json}`` with the token ids.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path


def generate(jobs_file: str) -> None:
    from vllm import LLM, SamplingParams

    for job in json.loads(Path(jobs_file).read_text(encoding="utf-8")):
        llm = LLM(
            model=job["dir"],
            model_impl="transformers",
            trust_remote_code=True,
            dtype=job.get("dtype", "float32"),
            enforce_eager=job.get("eager", True),
            max_model_len=128,
            gpu_memory_utilization=0.05,
            kv_cache_memory_bytes=64 << 20,
            seed=0,
        )
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=1)
        outputs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
        result = {
            "dir": job["dir"],
            "eager": job.get("eager", True),
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "logprobs": [
                [step[tok].logprob for tok, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)]
                for o in outputs
            ],
        }
        print("RESULT " + json.dumps(result), flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def query(base_url: str, model: str, prompts_file: str, max_tokens: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused")
    tokens = []
    for prompt in json.loads(Path(prompts_file).read_text(encoding="utf-8")):
        response = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=int(max_tokens),
            temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        tokens.append(list(response.choices[0].token_ids))
    print("RESULT " + json.dumps({"tokens": tokens}), flush=True)


if __name__ == "__main__":  # (vLLM starts its engine in a spawned process, which re-imports this file)
    {"generate": generate, "query": query}[sys.argv[1]](*sys.argv[2:])
