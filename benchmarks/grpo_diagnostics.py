"""Why GRPO's held-out gain in ``make run`` (cpu-tiny) is small and noisy: curves, kept checkpoint, errors.

From one cpu-tiny SFT checkpoint (``tinyseek run --preset cpu-tiny --name diag --stop-after sft``),
runs the pipeline's own GRPO stage settings (``pipeline.preset("cpu-tiny").grpo``: 250 steps,
32 prompts x 8 samples at T 0.6, lr 1e-4 (2e-4 before 2026-12-06), beta 0.04, EMA 0.95, 24 new
tokens) for each seed and, at step 0, every ``--eval-every`` steps and at the end, scores greedy
answers on the held-out set the eval stage uses (100 problems; before 2026-12-06 the pipeline's GRPO
logged its mid-run eval on the first 64 of them, and the set was drawn with replacement):

- pass@1 of the raw weights (what grpo.py's mid-run eval measures) and of an EMA shadow of the
  weights kept here with the stage's decay (an optimizer step-post hook; with mu = 1 one optimizer
  step is one GRPO step, as in grpo.py), both on 100 and on the first 64 problems;
- what the stage keeps: grpo.py saves the EMA weights after the last step, never a best mid-run
  checkpoint (the final eval call receives the EMA weights, which this script checks);
- an error breakdown of the SFT model's and the kept model's greedy answers with the reward
  module's graders: truncated at max tokens, format failure, wrong answer split by whether the think
  block's equations are true (``rewards.equations``/``consistency_score``), whether the answer equals
  the think block's last result, and by task and operator; plus per-problem flips SFT -> final.

    .venv/bin/python benchmarks/grpo_diagnostics.py --sft runs/diag/sft --seeds 0 --out runs/diag/diag-s0
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import tinyseek  # noqa: F401  (first: OMP_WAIT_POLICY before torch loads libgomp)
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from tinyseek import malloc, pipeline
from tinyseek import eval as ev
from tinyseek.post import common as C
from tinyseek.post import grpo
from tinyseek.post.heldout import heldout_problems
from tinyseek.post.rewards import (consistency_score, equations, extract_answer, extract_think, format_score,
                                   is_correct, parse_number)
from tinyseek.post.rollout import sample


def _ops(expr: str) -> str:
    ops = sorted(set(re.findall(r"(?<=\s)[-+*](?=\s)", expr)))
    return "".join(ops) or "?"


def classify(text: str, finished: bool, p) -> str:
    """One label per greedy answer (first that applies)."""
    if is_correct(text, p.answer, p.meta):
        return "correct"
    if not finished:
        return "truncated"
    if format_score(text) < 1:
        return "format" if extract_answer(text) is not None else "format_no_answer"
    think = extract_think(text)
    eqs = equations(think)
    if not eqs:
        return "wrong_no_equation"
    if consistency_score(text) < 1:
        return "wrong_false_equation"      # an equation in the think block is arithmetically false
    last = parse_number(eqs[-1][1])
    ans = parse_number(extract_answer(text))
    if last is not None and ans is not None and last != ans:
        return "wrong_answer_not_last_result"  # true steps, answer copied wrongly
    lhs = eqs[0][0].replace("(", "").replace(")", "")
    if " ".join(lhs.split()) not in " ".join(p.meta.get("expression", "").split()):
        return "wrong_misread_problem"     # true steps, but not of this problem's numbers
    return "wrong_other"


def greedy_detail(model, tok, problems, max_new_tokens: int, seed: int) -> list[dict]:
    """The same greedy decode as heldout.greedy_scores, kept per problem."""
    prompts = [C.prompt_ids(tok, p.prompt) for p in problems]
    out = sample(model, prompts, eos_id=tok.eos_id, stop_ids=tok.stop_ids, max_tokens=max_new_tokens,
                 temperature=0.0, seed=seed)
    rows = []
    for s, p in zip(out, problems):
        t = C.decode(tok, s.tokens)
        rows.append({"task": p.meta["task"], "ops": _ops(p.meta.get("expression", "")), "answer": p.answer,
                     "prompt": p.prompt, "text": t, "finished": s.finished, "n_tokens": len(s.tokens),
                     "ok": bool(is_correct(t, p.answer, p.meta)), "format": format_score(t),
                     "label": classify(t, s.finished, p)})
    return rows


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {"pass1": sum(r["ok"] for r in rows) / n, "pass1_64": sum(r["ok"] for r in rows[:64]) / min(64, n),
            "format": sum(r["format"] for r in rows) / n, "truncated": sum(not r["finished"] for r in rows) / n,
            "mean_len": sum(r["n_tokens"] for r in rows) / n}


def breakdown(rows: list[dict]) -> dict:
    out = {"labels": dict(Counter(r["label"] for r in rows))}
    for key in ("task", "ops"):
        groups: dict = {}
        for r in rows:
            g = groups.setdefault(r[key], [0, 0])
            g[0] += r["ok"]
            g[1] += 1
        out[f"by_{key}"] = {k: f"{a}/{b}" for k, (a, b) in sorted(groups.items())}
    off = Counter()
    for r in rows:
        if not r["ok"]:
            a, g = parse_number(extract_answer(r["text"])), parse_number(r["answer"])
            d = None if a is None or g is None else abs(a - g)
            off["none" if d is None else "1" if d == 1 else "2-3" if d <= 3 else "4-10" if d <= 10 else ">10"] += 1
    out["wrong_off_by"] = dict(off)
    distinct: dict = {}
    for r in rows:
        distinct[r["prompt"]] = r["ok"]
    out["distinct_prompts_correct"] = f"{sum(distinct.values())}/{len(distinct)}"
    neg = [r for r in rows if r["answer"].startswith("-")]
    out["negative_answers"] = f"{sum(r['ok'] for r in neg)}/{len(neg)}"
    return out


def run_seed(sft: str, seed: int, out: str, eval_every: int, n_eval: int, steps: int | None,
             overrides: dict | None = None) -> dict:
    cfg = pipeline.preset("cpu-tiny").grpo
    cfg.init, cfg.out_dir, cfg.name, cfg.seed, cfg.plots = sft, out, f"grpo-s{seed}", seed, False
    cfg.eval_every, cfg.eval_problems = eval_every, n_eval
    if steps:
        cfg.steps = steps
    for k, v in (overrides or {}).items():  # --set lr=1e-4 beta=0 ...: typed like the preset's value
        cur = getattr(cfg, k)
        setattr(cfg, k, v.lower() in ("1", "true", "yes") if isinstance(cur, bool) else type(cur)(v))
    cfg.validate()
    state = {"opt_steps": 0, "ema": None}

    def hook(opt, args, kwargs):  # one GRPO step (mu = 1): update the EMA shadow as grpo.py does
        ps = [p for g in opt.param_groups for p in g["params"]]
        with torch.no_grad():
            if state["ema"] is None:  # grpo.py clones the starting weights before step 1
                raise RuntimeError("EMA shadow not initialised at step 0")
            for e, p in zip(state["ema"], ps):
                e.lerp_(p.detach(), 1.0 - cfg.ema)
        state["opt_steps"] += 1

    handle = register_optimizer_step_post_hook(hook)
    curve, details = [], {}
    train_probs = C.make_problems(cfg.tasks, n_eval, seed=424_242, difficulty=cfg.difficulty, split="train")

    def evaluate(model, tok, problems, *, max_new_tokens, seed):
        step = state["opt_steps"]
        params = C.trainable(model)
        if state["ema"] is None:
            state["ema"] = [p.detach().clone() for p in params]
        t0 = time.time()
        raw = greedy_detail(model, tok, problems, max_new_tokens, seed)
        final = step == cfg.steps
        same = final and all(torch.equal(e, p) for e, p in zip(state["ema"], params))
        if final:  # grpo.py has copied its EMA into the model: the weights it keeps
            ema_rows = raw
        else:
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for e, p in zip(state["ema"], params):
                    p.copy_(e)
            ema_rows = greedy_detail(model, tok, problems, max_new_tokens, seed)
            with torch.no_grad():
                for s, p in zip(saved, params):
                    p.copy_(s)
        row = {"step": step, "raw": summary(raw), "ema": summary(ema_rows), "eval_s": round(time.time() - t0, 1)}
        if final:
            row["kept_equals_ema_shadow"] = same
        curve.append(row)
        print(f"[seed {seed}] step {step}: raw {row['raw']['pass1']:.2f} (64: {row['raw']['pass1_64']:.2f}) "
              f"ema {row['ema']['pass1']:.2f} (64: {row['ema']['pass1_64']:.2f}) fmt {row['raw']['format']:.2f} "
              f"trunc {row['raw']['truncated']:.2f}", flush=True)
        if step == 0 or final:
            details["sft" if step == 0 else "kept"] = raw
            # the same model on training-split problems of the same kind (what GRPO's rollouts see)
            tr = greedy_detail(model, tok, train_probs, max_new_tokens, seed)
            row["train_split_pass1"] = summary(tr)["pass1"]
            print(f"[seed {seed}] step {step}: greedy pass@1 on {len(tr)} train-split problems "
                  f"{row['train_split_pass1']:.2f}", flush=True)
        return {"pass@1": row["raw"]["pass1"], "format_rate": row["raw"]["format"],
                "mean_length": row["raw"]["mean_len"], "truncated_rate": row["raw"]["truncated"]}

    t0 = time.time()
    try:
        res = grpo.main(cfg, evaluate=evaluate)
    finally:
        handle.remove()
    wall = time.time() - t0
    metrics = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "reward_mean" in m]
    kl = [m.get("kl", 0.0) for m in train]
    flips = Counter((a["ok"], b["ok"]) for a, b in zip(details["sft"], details["kept"]))
    return {"seed": seed, "wall_s": round(wall, 1), "grpo_elapsed_s": res["elapsed_s"], "curve": curve,
            "sft_breakdown": breakdown(details["sft"]), "kept_breakdown": breakdown(details["kept"]),
            "flips": {"stay_ok": flips[(True, True)], "gained": flips[(False, True)],
                      "lost": flips[(True, False)], "stay_wrong": flips[(False, False)]},
            "train_acc_first20": statistics.mean(m["accuracy"] for m in train[:20]),
            "train_acc_last20": statistics.mean(m["accuracy"] for m in train[-20:]),
            "train_trunc_last20": statistics.mean(m["truncated_rate"] for m in train[-20:]),
            "kl_last20": statistics.mean(kl[-20:]), "kl_max": max(kl),
            "examples_kept_wrong": [{k: r[k] for k in ("prompt", "answer", "text", "label")}
                                    for r in details["kept"] if not r["ok"]][:12],
            "config": {k: getattr(cfg, k) for k in ("steps", "prompts_per_step", "group_size", "temperature",
                                                     "lr", "beta", "ema", "max_new_tokens", "warmup_steps")}}


def analyse(ckpts: list[str], n: int) -> list[dict]:
    """Error breakdown of saved checkpoints (SFT, kept GRPO) on the held-out and a train-split set."""
    from tinyseek.quant.load import load_model
    from tinyseek.serve.loading import load_tokenizer_for
    held = heldout_problems("arithmetic,chain_sum", n, 0, 1)
    train = C.make_problems("arithmetic,chain_sum", n, seed=424_242, difficulty=1, split="train")
    out = []
    for ck in ckpts:
        model, meta = load_model(ck, device="cpu")
        tok = load_tokenizer_for(ck, "", meta)
        h, t = greedy_detail(model, tok, held, 24, 0), greedy_detail(model, tok, train, 24, 0)
        r = {"ckpt": ck, "heldout": summary(h), "train_split": summary(t), "heldout_breakdown": breakdown(h),
             "train_breakdown": breakdown(t)}
        print(json.dumps(r, default=str), flush=True)
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default="runs/diag/sft")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-problems", type=int, default=100)
    ap.add_argument("--steps", type=int, default=0, help="override the preset's 250 steps (0 = keep)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--sft-passk", action="store_true", help="also the SFT model's pass@8 (8 samples, T 1.0)")
    ap.add_argument("--out", default="runs/diag/diagnostics")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override GRPO config fields of the cpu-tiny preset (lr=1e-4 beta=0 ema=0 ...)")
    ap.add_argument("--analyse", nargs="+", default=None, metavar="CKPT",
                    help="only the error breakdown of these checkpoints (no GRPO run)")
    a = ap.parse_args()
    malloc.tune()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.analyse:
        (out / "analyse.json").write_text(json.dumps(analyse(a.analyse, a.eval_problems), indent=1, default=str))
        return
    results = []
    if a.sft_passk:
        c = ev.Config(ckpt=a.sft, tasks="arithmetic,chain_sum", difficulty=1, n_problems=a.eval_problems,
                      max_new_tokens=24, out=str(out / "sft_eval.json"))
        r = ev.main(c)
        results.append({"sft_eval": {k: r[k] for k in ("pass@1", "pass@8", "sampled_accuracy", "format_rate")}})
    probs = heldout_problems("arithmetic,chain_sum", a.eval_problems, 0, 1)
    uniq = len({p.prompt for p in probs})
    print(f"held-out set: {len(probs)} problems, {uniq} distinct prompts; "
          f"binomial SE at p=0.45: {math.sqrt(0.45 * 0.55 / len(probs)):.3f}", flush=True)
    for s in a.seeds:
        r = run_seed(a.sft, s, str(out), a.eval_every, a.eval_problems, a.steps or None,
                     dict(kv.split("=", 1) for kv in a.set))
        r["heldout_distinct_prompts"] = uniq
        results.append(r)
        (out / f"seed{s}.json").write_text(json.dumps(r, indent=1, default=str))
        print(json.dumps({k: v for k, v in r.items() if k not in ("curve", "examples_kept_wrong")}, default=str),
              flush=True)
    (out / "summary.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
