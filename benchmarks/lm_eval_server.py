"""lm-eval against ``tinyseek serve`` (its OpenAI completions API) vs lm-eval's own HF backend.

Builds a small model (random weights, byte tokenizer; or ``--ckpt`` a run of yours whose model
exports to Hugging Face), saves it as a tinyseek checkpoint and exports it with
``tinyseek.interop.hf_export``; starts ``tinyseek serve`` on 127.0.0.1; runs lm-eval's
``local-completions`` model on two tasks that ship in ``benchmarks/lm_eval_tasks/`` (no hub
download): ``tinyseek_ll`` (multiple choice: loglikelihood requests, token-id prompts, ``echo`` +
``logprobs``) and ``tinyseek_gen`` (``generate_until``); then lm-eval's ``hf`` model on the exported
directory on the same tasks; prints both scores and the largest per-request loglikelihood difference.

Installs ``lm-eval[api]`` (with ``-c constraints.txt``) when it is missing; it is not a requirement.

    .venv/bin/python benchmarks/lm_eval_server.py [--ckpt RUN] [--port 8123]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["tinyseek_ll", "tinyseek_gen"]


def ensure_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"),
                        "lm-eval[api]"], check=True)


def build_model(work: Path, ckpt: str) -> tuple[Path, Path]:
    """``(tinyseek checkpoint dir, exported HF dir)``."""
    import torch

    from tinyseek.config import model_micro
    from tinyseek.interop.hf_export import export_hf
    from tinyseek.model.transformer import Transformer
    from tinyseek.serve.loading import load_for_serving
    from tinyseek.tokenizer import byte_tokenizer
    from tinyseek.train.checkpoint import save_checkpoint

    if ckpt:
        model, tok, _ = load_for_serving(ckpt, "", "cpu", "fp32")
        run = Path(ckpt)
    else:
        tok = byte_tokenizer()
        cfg = model_micro()
        cfg.vocab_size, cfg.score_func = tok.vocab_size, "sigmoid"  # exports exactly (DeepseekV3)
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        run = work / "run"
        save_checkpoint(run / "ckpt", 1, model, None, {})
        tok.save(run / "tokenizer")
    hf = work / "hf"
    print("export:", export_hf(model, hf, tokenizer=tok)["architecture"], flush=True)
    return run, hf


def serve(run: Path, port: int) -> subprocess.Popen:
    import httpx
    proc = subprocess.Popen([sys.executable, "-m", "tinyseek", "serve", "--ckpt", str(run), "--port", str(port),
                             "--device", "cpu", "--dtype", "fp32", "--max-tokens", "64", "--log-level", "warning"],
                            cwd=ROOT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("tinyseek serve did not come up")


def evaluate(model: str, model_args: dict) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=str(ROOT / "benchmarks" / "lm_eval_tasks"))
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=tm,
                                   log_samples=True, batch_size=8, num_fewshot=0)


def loglikelihoods(res: dict) -> list[float]:
    return [float(r[0][0]) for s in res["samples"]["tinyseek_ll"] for r in s["resps"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="", help="a tinyseek run / checkpoint to use instead of a random micro model")
    ap.add_argument("--port", type=int, default=8123)
    args = ap.parse_args()
    ensure_lm_eval()
    os.chdir(ROOT)  # the task YAMLs name their data files from the repository root
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        run, hf = build_model(Path(tmp), args.ckpt)
        proc = serve(run, args.port)
        try:
            t0 = time.perf_counter()
            api = evaluate("local-completions", {
                "model": "tinyseek", "base_url": f"http://127.0.0.1:{args.port}/v1/completions",
                "tokenizer_backend": "huggingface", "tokenizer": str(hf), "tokenized_requests": True,
                "num_concurrent": 4, "max_retries": 1, "max_length": 256})
            t_api = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(30)
        t0 = time.perf_counter()
        ref = evaluate("hf", {"pretrained": str(hf), "device": "cpu", "dtype": "float32"})
        t_hf = time.perf_counter() - t0
    a, b = loglikelihoods(api), loglikelihoods(ref)
    assert len(a) == len(b), (len(a), len(b))
    print(f"{'task':14s} {'metric':12s} {'server':>10s} {'hf':>10s}")
    for task in TASKS:
        for k, v in api["results"][task].items():
            if k.endswith(",none") and "stderr" not in k:
                print(f"{task:14s} {k.split(',')[0]:12s} {v:10.4f} {ref['results'][task][k]:10.4f}")
    print(f"loglikelihood requests: {len(a)}; max |server - hf| = {max(abs(x - y) for x, y in zip(a, b)):.2e}")
    gen_a = [s["resps"][0][0] for s in api["samples"]["tinyseek_gen"]]
    gen_b = [s["resps"][0][0] for s in ref["samples"]["tinyseek_gen"]]
    print(f"generate_until: {sum(x == y for x, y in zip(gen_a, gen_b))}/{len(gen_a)} identical outputs; "
          f"time server {t_api:.1f} s, hf {t_hf:.1f} s")


if __name__ == "__main__":
    main()
