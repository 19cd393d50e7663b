"""Serving benchmark, measured side by side in one run:

1. Load: ``tinyseek serve`` in a subprocess on 127.0.0.1; N concurrent clients (1, 4, 16, 64) each send
   ``/v1/completions`` requests (``max_tokens`` tokens, ``ignore_eos``) one after the other until the
   level's time limit (8 s; requests in flight then finish) or request budget is reached. Reported: aggregate completion tokens/s, p50/p99 request latency, errors.
   The levels run ``--rounds`` times, interleaved (1, 4, 16, 64, 1, 4, ...), and the best round of
   each level is kept: on a shared machine one level can otherwise land in a busy minute. The
   16 vs 1 client target is judged on the median over rounds of each round's 16-client / 1-client
   ratio (adjacent levels, so about the same machine state): the best rounds of the two levels can
   come from different machine states (on this 2-core VM a 16-row decode step takes 1.7 ms in a
   quiet minute and 2.2-2.8 ms when neighbours load the memory bus, a 1-row step 1.0-1.2 ms), and
   that ratio is printed too.
   Target: 16 clients >= 8x the aggregate tokens/s of 1 client. ``--engine-cpus auto`` runs the
   server with its engine process pinned to all CPUs but the last, and the load generator then
   runs on the last one with the server's HTTP side, standing in for remote clients
   (``--pin-clients none`` lets the OS place it). ``--client raw`` replaces httpx by a minimal
   asyncio HTTP/1.1 keep-alive client (TCP_NODELAY: without it Nagle + delayed ACK added ~20 ms to
   every request), so the load generator takes less of the CPU it shares with the server.
2. Engine alone vs Hugging Face ``generate`` on the same weights (exported with
   ``tinyseek.interop.hf_export.export_hf`` and loaded by ``AutoModelForCausalLM``), greedy, at batch
   1 and 16 with equal-length prompts and a fixed number of new tokens. Target: engine ahead at
   batch 1 and >= 2x at batch 16. Also reported: how many greedy tokens agree between the two, and
   the same engine with the fp32 C kernels switched off (``tinyseek.kernels.loader.enable_all(False)``:
   what the kernels buy).

    .venv/bin/python benchmarks/serve_load.py                 # CPU: cpu-tiny-sized model, fp32
    .venv/bin/python benchmarks/serve_load.py --device cuda   # GPU: gpu-small-sized model, bf16

The model has random weights (speed does not depend on them); its router uses sigmoid scores so
that it maps exactly onto HF's DeepseekV3. Timings on a shared machine are noisy: repetitions are
interleaved and the best of ``--reps`` is kept for the engine-vs-HF part.
"""
from __future__ import annotations

import argparse
import os
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build_model(preset: str, device: str, dtype: torch.dtype):
    from tinyseek.config import model_preset
    from tinyseek.model.transformer import Transformer

    cfg = model_preset(preset)
    cfg.score_func = "sigmoid"  # exact HF (DeepseekV3) mapping; same compute as softmax routing
    torch.manual_seed(0)
    return Transformer(cfg).to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------
# 1. HTTP load
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tinyseek", "serve", "--ckpt", str(run_dir), "--port", str(port),
           "--device", args.device, "--max-batch", str(max(args.clients)), "--max-tokens", str(args.max_tokens),
           "--max-queue", "1000", "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning",
           "--engine-process", args.engine_process, "--engine-cpus", args.engine_cpus,
           "--mix-prefill", args.mix_prefill]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (one connection, one request at a
    time): POST JSON, read the status line, headers and a Content-Length body. ``--client raw``
    uses one per simulated client instead of httpx, so the load generator (which stands in for
    remote clients) takes less of the CPU it shares with the server here."""

    def __init__(self, url: str):
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.reader = self.writer = None

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(ln.split(":", 1)[1]) for ln in lines[1:] if ln.lower().startswith("content-length:"))
        return status, json.loads(await self.reader.readexactly(length))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load_level(url: str, n_clients: int, per_client: int, max_tokens: int, time_limit: float,
                     kind: str = "httpx") -> dict:
    import httpx

    lat, tokens, errors = [], 0, 0
    deadline = time.monotonic() + time_limit

    async def client(i: int, http):
        nonlocal tokens, errors
        raw = RawClient(url) if kind == "raw" else None
        for j in range(per_client):
            if time.monotonic() > deadline:
                break
            body = {"prompt": f"client {i} request {j}: tell me a story about the number {i * 31 + j}",
                    "max_tokens": max_tokens, "temperature": 0.8, "seed": i * 1000 + j, "ignore_eos": True}
            t0 = time.monotonic()
            try:
                if raw is not None:
                    status, doc = await raw.post("/v1/completions", body)
                else:
                    r = await http.post(url + "/v1/completions", json=body)
                    status = r.status_code
                    doc = r.json() if status == 200 else None
                if status != 200:
                    errors += 1
                    continue
                tokens += doc["usage"]["completion_tokens"]
                lat.append(time.monotonic() - t0)
            except (httpx.HTTPError, OSError, ValueError, asyncio.IncompleteReadError, StopIteration):
                errors += 1
                if raw is not None:
                    await raw.close()
                    raw = RawClient(url)
        if raw is not None:
            await raw.close()

    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    async with httpx.AsyncClient(timeout=max(time_limit * 2, 60), limits=limits) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(client(i, http) for i in range(n_clients)))
        wall = time.monotonic() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else float("nan")  # noqa: E731
    return {"clients": n_clients, "requests": len(lat), "errors": errors, "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0, "p50_s": q(0.5), "p99_s": q(0.99)}


def scrape(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for ln in httpx.get(url + "/metrics").text.splitlines():
        if ln and not ln.startswith("#") and "{" not in ln:
            k, v = ln.rsplit(" ", 1)
            out[k] = float(v)
    return out


def make_tokenizer(kind: str, vocab_size: int):
    """``bpe``: a byte-level BPE of the model's vocabulary trained on the shipped Shakespeare sample
    (a few seconds), so prompts have realistic token counts; ``bytes``: one token per byte."""
    from tinyseek.tokenizer import byte_tokenizer, train_tokenizer

    if kind == "bytes":
        return byte_tokenizer()
    files = sorted((REPO / "tinyseek" / "data" / "samples" / "shakespeare").rglob("*.txt"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return train_tokenizer(texts, vocab_size)


def run_load(args, model) -> list[dict]:
    from tinyseek.train.checkpoint import save_checkpoint
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        save_checkpoint(run_dir / "ckpt", 0, model.float().cpu(), None, {})
        model.to(args.device, dtype=args.torch_dtype)
        tok = make_tokenizer(args.tokenizer, model.cfg.vocab_size)
        tok.save(run_dir / "tokenizer")
        prompt = "client 0 request 0: tell me a story about the number 17"
        print(f"  tokenizer {args.tokenizer} (vocab {tok.vocab_size}): a prompt is ~{len(tok.encode(prompt))} tokens",
              flush=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(run_dir, args, port)
        saved_affinity = None
        if args.pin_clients == "auto" and args.engine_process == "true" and hasattr(os, "sched_setaffinity"):
            from tinyseek.serve.engine_proc import available_cpus, parse_cpus, pin_process

            engine_cpus = parse_cpus(args.engine_cpus, available_cpus())
            if engine_cpus:
                saved_affinity = available_cpus()
                pin_process([c for c in saved_affinity if c not in engine_cpus])
        try:
            t0 = time.monotonic()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("server exited:\n" + proc.stdout.read())
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > 300:
                    raise RuntimeError("server did not start in 300 s")
                time.sleep(0.2)
            asyncio.run(load_level(url, 2, 1, 8, 60))  # warm-up
            best: dict[int, dict] = {}
            errs: dict[int, int] = {}  # errors of every round, not only the kept one
            per_round: dict[int, list[float]] = {}  # tokens/s of every round
            for rnd, n in ((r, n) for r in range(args.rounds) for n in args.clients):
                per_client = max(args.min_requests_per_client, args.requests // n)
                m0 = scrape(url)
                res = asyncio.run(load_level(url, n, per_client, args.max_tokens, args.time_limit, args.client))
                m1 = scrape(url)
                steps = m1["tinyseek_batch_size_count"] - m0["tinyseek_batch_size_count"]
                res["mean_batch"] = (m1["tinyseek_batch_size_sum"] - m0["tinyseek_batch_size_sum"]) / max(steps, 1)
                res["mean_step_ms"] = 1000 * (m1["tinyseek_decode_step_seconds_sum"]
                                              - m0["tinyseek_decode_step_seconds_sum"]) / max(steps, 1)
                res["prefills"] = m1["tinyseek_prefills_total"] - m0["tinyseek_prefills_total"]
                res["prefill_s"] = m1["tinyseek_prefill_seconds_total"] - m0["tinyseek_prefill_seconds_total"]
                res["decode_s"] = m1["tinyseek_decode_step_seconds_sum"] - m0["tinyseek_decode_step_seconds_sum"]
                res["round"] = rnd
                errs[n] = errs.get(n, 0) + res["errors"]
                per_round.setdefault(n, []).append(res["tokens_per_s"])
                if n not in best or res["tokens_per_s"] > best[n]["tokens_per_s"]:
                    best[n] = res
                print(f"  {n:3d} clients: {res['requests']:4d} requests, {res['errors']} errors, "
                      f"{res['tokens_per_s']:9.1f} tok/s, p50 {res['p50_s']:.3f} s, p99 {res['p99_s']:.3f} s "
                      f"(server: mean batch {res['mean_batch']:.1f}, decode step {res['mean_step_ms']:.1f} ms, "
                      f"{res['prefills']:.0f} prefills {res['prefill_s']:.2f} s, decode {res['decode_s']:.2f} s)",
                      flush=True)
            results = [{**best[n], "errors_all_rounds": errs[n], "rounds_tokens_per_s": per_round[n]}
                       for n in args.clients]
            if args.rounds > 1:
                print("  best round per level: " + ", ".join(f"{r['clients']} clients {r['tokens_per_s']:.1f} tok/s "
                                                         f"(p50 {r['p50_s']:.3f} s, p99 {r['p99_s']:.3f} s)"
                                                         for r in results), flush=True)
        finally:
            if saved_affinity is not None:
                pin_process(saved_affinity)
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return results


# ---------------------------------------------------------------------------------------------
# 2. engine vs HF generate
# ---------------------------------------------------------------------------------------------
def run_engine_vs_hf(args, model) -> list[dict]:
    from tinyseek.kernels import loader as ckernels
    from tinyseek.serve.engine import Engine, SamplingParams

    try:
        from tinyseek.interop.hf_export import export_hf
    except ImportError:
        print("  HF export (tinyseek.interop.hf_export) not available: engine-vs-HF pending")
        return []
    from transformers import AutoModelForCausalLM

    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model.float().cpu(), tmp)
        model.to(dev, dtype=args.torch_dtype)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=args.torch_dtype).to(dev).eval()
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    results = []
    for B in args.hf_batches:
        prompts = torch.randint(0, min(V, 256), (B, args.prompt_len), generator=g)
        M = args.new_tokens
        eng = Engine(model, None, max_batch=B, max_len=args.prompt_len + M + 1)
        sp = SamplingParams(max_tokens=M, ignore_eos=True)

        def run_engine():
            outs = eng.generate(prompts.tolist(), sp)
            return [o.token_ids for o in outs]

        @torch.inference_mode()
        def run_hf():
            ids = prompts.to(dev)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=M, min_new_tokens=M,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
            return out[:, args.prompt_len:].tolist()

        def timed(fn):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0, r

        def run_engine_plain():  # the same engine with the fp32 C kernels switched off (PyTorch ops)
            before = ckernels.enable_all(False)
            try:
                return run_engine()
            finally:
                ckernels.restore(before)

        timed(run_engine), timed(run_hf), timed(run_engine_plain)  # warm-up
        te, th, tp = [], [], []
        for _ in range(args.reps):  # interleaved
            t, ours = timed(run_engine)
            te.append(t)
            t, theirs = timed(run_hf)
            th.append(t)
            t, plain = timed(run_engine_plain)
            tp.append(t)
        plain_agree = statistics.mean(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), M) / M
                                      for x, y in zip(ours, plain))
        agree = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / (B * M)
        # tokens agree up to the first divergence (later tokens follow different prefixes)
        prefix = statistics.mean(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), M) / M
                                 for x, y in zip(ours, theirs))
        res = {"batch": B, "new_tokens": M, "engine_tok_s": B * M / min(te), "hf_tok_s": B * M / min(th),
               "engine_plain_tok_s": B * M / min(tp), "greedy_prefix_agreement": prefix,
               "greedy_token_agreement": agree, "plain_prefix_agreement": plain_agree}
        res["ratio"] = res["engine_tok_s"] / res["hf_tok_s"]
        results.append(res)
        print(f"  batch {B:3d}: engine {res['engine_tok_s']:9.1f} tok/s, HF generate {res['hf_tok_s']:9.1f} tok/s, "
              f"ratio {res['ratio']:.2f}x (greedy agreement: {prefix:.0%} of tokens before first divergence); "
              f"engine without the C kernels {res['engine_plain_tok_s']:9.1f} tok/s "
              f"(kernels {res['engine_tok_s'] / res['engine_plain_tok_s']:.2f}x, agreement {plain_agree:.0%})",
              flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="", help="model preset (default cpu-tiny on CPU, gpu-small on CUDA)")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=2048, help="requests per level at most (split over its clients)")
    ap.add_argument("--min-requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--time-limit", type=float, default=8.0,
                    help="seconds per load level: no request starts later (equal durations expose every level "
                         "to the same load from other jobs on a shared machine)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0,
                    help="server --max-wait-ms: an idle engine gathers a burst of requests this long at most")
    ap.add_argument("--mix-prefill", choices=["true", "false"], default="true",
                    help="tinyseek serve --mix-prefill: new prompts ride along with the decode step's forward")
    ap.add_argument("--engine-process", choices=["true", "false"], default="true",
                    help="the server's engine in its own process (the server's default) or in its thread")
    ap.add_argument("--engine-cpus", default="",
                    help="the server's --engine-cpus (default: none; auto: the engine process on all CPUs but the last)")
    ap.add_argument("--pin-clients", choices=["auto", "none"], default="auto",
                    help="auto: the load generator runs on the CPUs the engine does not own (it stands in "
                         "for remote clients); none: wherever the OS puts it")
    ap.add_argument("--client", choices=["httpx", "raw"], default="httpx",
                    help="load generator: httpx, or a minimal asyncio HTTP/1.1 client (less CPU on the shared cores)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="load rounds (all levels each, interleaved); the best round of each level is kept")
    ap.add_argument("--hf-batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokenizer", choices=["bpe", "bytes"], default="bpe")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    args.clients = [int(x) for x in args.clients.split(",")]
    args.hf_batches = [int(x) for x in args.hf_batches.split(",")]
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("gpu-small" if cuda else "cpu-tiny")
    args.torch_dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(args.preset, args.device, args.torch_dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.preset} ({n_params / 1e6:.1f}M params, sigmoid router), device {args.device}, "
          f"dtype {args.torch_dtype}, torch threads {torch.get_num_threads()}", flush=True)
    out: dict = {"device": args.device, "preset": args.preset, "params": n_params}
    if not args.skip_load:
        print(f"1. HTTP load: /v1/completions, {args.max_tokens} tokens each, ignore_eos, loopback", flush=True)
        out["load"] = load = run_load(args, model)
        by = {r["clients"]: r for r in load}
        if 1 in by and 16 in by and by[1]["tokens_per_s"] > 0:
            r16 = by[16]["tokens_per_s"] / by[1]["tokens_per_s"]
            out["scaling_16_vs_1"] = r16
            n_err = sum(r["errors_all_rounds"] for r in load)
            # each round's 16-client level against the 1-client level next to it (same machine state)
            paired = [b / a for a, b in zip(by[1]["rounds_tokens_per_s"], by[16]["rounds_tokens_per_s"]) if a > 0]
            out["scaling_16_vs_1_per_round"] = paired
            med = statistics.median(paired)
            print(f"  16 clients / 1 client aggregate tokens/s: best rounds {r16:.2f}x; per round "
                  f"{', '.join(f'{x:.2f}x' for x in paired)}, median {med:.2f}x (target >= 8x: "
                  f"{'met' if med >= 8 else 'NOT met'}); errors total (all rounds): {n_err}", flush=True)
    if not args.skip_hf:
        print(f"2. engine vs HF generate (greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens)", flush=True)
        out["engine_vs_hf"] = hf = run_engine_vs_hf(args, model)
        for r in hf:
            target = 1.0 if r["batch"] == 1 else 2.0
            print(f"  batch {r['batch']}: {r['ratio']:.2f}x (target > {target:g}x: "
                  f"{'met' if r['ratio'] > target or (target == 2.0 and r['ratio'] >= 2.0) else 'NOT met'})")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
