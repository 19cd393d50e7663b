"""GRPO rollout throughput and step-time breakdown, measured side by side in ONE run:

1. rollout tokens/s of the batched KV-cache engine (all ``N*G`` samples of a GRPO step in one batch)
   against sampling the same prompts one sequence at a time (same engine, ``max_batch=1``), with
   ``ignore_eos`` so both generate exactly the same number of tokens; the ratio is printed;
2. the time of one GRPO step split into generate / score / train (means over ``--steps`` steps of
   ``tinyseek grpo`` on a fresh model), from that run's metrics.jsonl.

    .venv/bin/python benchmarks/grpo_rollout.py                  # micro model, N=8 G=8, 32 tokens
    .venv/bin/python benchmarks/grpo_rollout.py --model cpu-tiny --tokens 48 --json out.json

Timings are medians of ``--repeats`` interleaved repetitions (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import tinyseek  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp, as the CLI does)
import torch

from tinyseek.config import model_preset
from tinyseek.model.transformer import Transformer
from tinyseek.post import common as C
from tinyseek.serve.engine import Engine, SamplingParams
from tinyseek.tokenizer import byte_tokenizer


def rollout_tps(model, prompts, tokens: int, batch: int) -> float:
    params = [SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(prompts))]
    t0 = time.perf_counter()
    if batch == 1:
        eng = Engine(model, None, max_batch=1)
        outs = [eng.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    else:
        eng = Engine(model, None, max_batch=batch)
        outs = eng.generate(prompts, params)
    dt = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    assert n == tokens * len(prompts), (n, tokens * len(prompts))
    return n / dt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="micro", help="model preset (micro, cpu-tiny, ...)")
    ap.add_argument("--prompts", type=int, default=8, help="N prompts per GRPO step")
    ap.add_argument("--group", type=int, default=8, help="G samples per prompt")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per sample")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (median reported)")
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps for the time breakdown")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = byte_tokenizer()
    cfg = model_preset(a.model)
    cfg.vocab_size = max(cfg.vocab_size, tok.vocab_size)
    model = Transformer(cfg).eval()
    probs = C.make_problems("arithmetic", a.prompts, seed=0, difficulty=1)
    prompts = [C.prompt_ids(tok, p.prompt) for p in probs for _ in range(a.group)]
    B = len(prompts)
    rollout_tps(model, prompts[:4], 4, 4)  # warm-up
    batched, single = [], []
    for _ in range(a.repeats):
        batched.append(rollout_tps(model, prompts, a.tokens, B))
        single.append(rollout_tps(model, prompts, a.tokens, 1))
    res = {"model": a.model, "params": model.num_params(), "sequences": B, "tokens_per_seq": a.tokens,
           "batched_tok_s": statistics.median(batched), "single_tok_s": statistics.median(single)}
    res["speedup"] = res["batched_tok_s"] / res["single_tok_s"]
    print(f"rollout {B} seqs x {a.tokens} tokens ({a.model}, {res['params'] / 1e6:.2f}M params): "
          f"batched {res['batched_tok_s']:.0f} tok/s vs one-at-a-time {res['single_tok_s']:.0f} tok/s "
          f"= {res['speedup']:.1f}x")

    from tinyseek.common import read_metrics
    from tinyseek.post import grpo
    with tempfile.TemporaryDirectory() as d:
        gcfg = grpo.Config(model=cfg, out_dir=d, name="b", steps=a.steps, prompts_per_step=a.prompts,
                           group_size=a.group, max_new_tokens=a.tokens, eval_every=0, eval_problems=8, plots=False)
        grpo.main(gcfg)
        rows = [r for r in read_metrics(f"{d}/b/metrics.jsonl") if "t_generate" in r]
    for k in ("t_generate", "t_score", "t_train", "step_time"):
        res[k] = statistics.mean(r[k] for r in rows)
    tot = res["step_time"]
    print(f"GRPO step ({B} samples, <= {a.tokens} tokens): {tot:.2f} s = generate {res['t_generate']:.2f} s "
          f"({100 * res['t_generate'] / tot:.0f}%) + score {res['t_score']:.3f} s ({100 * res['t_score'] / tot:.0f}%) "
          f"+ train {res['t_train']:.2f} s ({100 * res['t_train'] / tot:.0f}%)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
