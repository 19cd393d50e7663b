"""Quantization benchmark: fp32 vs int8 (W8A16) vs int4 (W4A16, each calibration) vs W8A8, one table.

    .venv/bin/python benchmarks/quant.py                      # trains a cpu-tiny model first (~minutes)
    .venv/bin/python benchmarks/quant.py --ckpt runs/x/ckpt    # or quantize an existing checkpoint
    .venv/bin/python benchmarks/quant.py --ckpt ... --task-model runs/sft --task arithmetic

Columns: file size of ``model.safetensors`` and its ratio to fp32; resident weight memory (bytes
of the model's tensors, RoPE tables excluded), its ratio, and the ratio over the quantized part
only ("qpart x"); held-out perplexity (val shards beside the checkpoint) and its change; greedy
KV-cache decode tokens/s (batch 1, ``model(tok, cache=...)`` as the serving engine calls it, all
variants timed in interleaved rounds, median) and its ratio to fp32, as shipped (the fused C
kernels of ``tinyseek/kernels/quant.py``, on by default) and ("plain") with them off
(``TINYSEEK_QUANT_KERNELS=0``: PyTorch ops only); held-out task pass@1 (greedy) when
``--task-model`` is given (that model quantized with the same settings).

The quantized variants quantize the token embedding too (format v2); ``int8 rtn-fpemb`` is int8
with the embedding left fp32 (the format-v1 layout), to show what the embedding costs on disk.

Calibration rows: ``rtn`` = round-to-nearest min-max scales, no data; ``minmax`` / ``percentile``
/ ``kl`` = AWQ-style scale search on the calibration batches with that activation-range
calibrator (see ``tinyseek/quant/calibrate.py``); ``qat`` = fake-quant fine-tune then convert;
``ft-ctrl`` / ``ft+rtn`` = the same fine-tune in fp32 (and that model RTN-quantized): the control
that separates what QAT buys from what more training of an under-trained model buys.
``fold MB``: the MLA decode weights folded once after the first decode step (``MLA._folded``, fp32,
from the dequantised weights in the quantized models): resident during decode on top of ``mem MB``,
never written to the checkpoint.
``fp32 sorted-moe`` is the float model with the per-expert MoE dispatch forced everywhere (speed
reference; for one decoded token the default ``auto`` picks it too, so the two fp32 rows differ
only by timing noise at batch 1).
``w8a8`` = int8 weights x per-token dynamic uint8 activations (int32 products; ``rtn`` = quantized
as is, ``qat`` = weights + activations fake-quantized during the same fine-tune, ``ft+rtn`` = the
fp32 fine-tune control quantized). Its "plain" column is the ``torch._int_mm`` path.
``torchao-int8`` (with ``--torchao``) is torchao's Int8WeightOnlyConfig applied to the Linear
layers (its experts stay fp32), for comparison.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tinyseek  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp, as the CLI does)
import torch  # noqa: E402

from tinyseek.model.moe import MoE  # noqa: E402
from tinyseek.quant.quantize import QuantSpec, quant_config, quantize_model, save_quantized, weight_bytes  # noqa: E402


def train_cpu_tiny(run_dir: Path, steps: int) -> Path:
    from tinyseek.train import pretrain

    cfg = pretrain.preset("cpu-tiny")
    cfg.run_dir, cfg.steps, cfg.progress, cfg.ckpt_every = str(run_dir), steps, False, 0
    cfg.eval_every = 0
    pretrain.main(cfg)
    return run_dir


@torch.inference_mode()
def perplexity(model, batches) -> float:
    return math.exp(sum(float(model(x, y).ce_loss) for x, y in batches) / len(batches))


@torch.inference_mode()
def decode_seconds(model, prompt, n_new: int) -> float:
    cache = model.new_cache(1, max_len=prompt.shape[1] + n_new + 1)
    logits = model(prompt, cache=cache).logits[:, -1]
    t0 = time.perf_counter()
    for _ in range(n_new):
        nxt = logits.argmax(-1, keepdim=True)
        logits = model(nxt, cache=cache).logits[:, -1]
    return time.perf_counter() - t0


def task_accuracy(model, tok, problems) -> float:
    from tinyseek.eval import evaluate

    return evaluate(model, tok, problems, n_samples=0, max_new_tokens=64)["pass@1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="", help="checkpoint (step dir / ckpt root / run dir); empty = train cpu-tiny")
    ap.add_argument("--train-steps", type=int, default=300, help="steps for the cpu-tiny model trained when no --ckpt")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--eval-batches", type=int, default=16, help="held-out batches of 8 x 256 tokens")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    ap.add_argument("--groups", default="32,64,128")
    ap.add_argument("--calibrations", default="rtn,minmax,percentile,kl")
    ap.add_argument("--qat-steps", type=int, default=100, help="0 = no QAT row")
    ap.add_argument("--torchao", action="store_true", help="add torchao Int8WeightOnlyConfig (slow import)")
    ap.add_argument("--task-model", default="", help="a task (SFT/RL) checkpoint for held-out accuracy")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--task-problems", type=int, default=100)
    ap.add_argument("--task-difficulty", type=int, default=1, help="0 = the task's own mix")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain (kernels off) decode column")
    ap.add_argument("--data", default="", help="token shard folder (default: beside the checkpoint, or the "
                    "run's config.json 'data')")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from tinyseek.quant.qat import convert_qat, iter_batches, prepare_qat, qat_finetune
    from tinyseek.quant.stage import find_calib_data, held_out_path, load_batches
    from tinyseek.quant.load import load_model
    from tinyseek.train.checkpoint import resolve_checkpoint, save_weights

    work = Path(tempfile.mkdtemp(prefix="tinyseek-quant-bench-"))
    if not args.ckpt:
        t = time.time()
        train_cpu_tiny(work / "run", args.train_steps)
        args.ckpt = str(work / "run")
        print(f"trained cpu-tiny for {args.train_steps} steps in {time.time() - t:.0f}s -> {args.ckpt}")
    step = resolve_checkpoint(args.ckpt)
    base, meta = load_model(step, device=args.device)
    data = find_calib_data(argparse.Namespace(calib_data=args.data), step) or _data_from_run_config(step)
    if data is None:
        raise SystemExit(f"no token shards beside {step} (expected <run>/data/train); pass --data")
    T = min(256, base.cfg.max_seq_len)
    calib = load_batches(data, args.calib_batches, 8, T, args.device)
    val = load_batches(held_out_path(data) or data, args.eval_batches, 8, T, args.device)
    calib_x = [x for x, _ in calib]

    task = None
    if args.task_model:
        from tinyseek.post.heldout import heldout_problems
        from tinyseek.post.common import load_tokenizer_for, make_problems, prompt_ids, worked_response

        tok = load_tokenizer_for(args.task_model, "")
        tmodel, _ = load_model(args.task_model, device=args.device)
        diff = args.task_difficulty or None
        probs = heldout_problems(args.task, args.task_problems, 0, diff)
        train_probs = make_problems(args.task, 64, seed=1, difficulty=diff)  # calibration: training split
        seqs = [(prompt_ids(tok, p.prompt) + tok.encode(worked_response(p)))[:T] for p in train_probs]
        L = min(len(s) for s in seqs)
        task_calib = [torch.tensor([s[:L] for s in seqs[i:i + 8]], device=args.device) for i in range(0, 64, 8)]
        task = (tok, tmodel, probs, task_calib)

    # ---- build the variants -------------------------------------------------------------
    variants: list[tuple[str, torch.nn.Module, Path | None, str, object]] = []
    fdir = work / "fp32"
    fdir.mkdir()
    save_weights(base.state_dict(), fdir / "model.safetensors")
    variants.append(("fp32", base, fdir / "model.safetensors", "-", task[1] if task else None))
    # the quantized models run their MoE layers with the per-expert ("sorted") dispatch (see
    # quantize.prefer_per_expert_dispatch); the same dispatch in fp32, for a like-for-like speed
    srt = copy.deepcopy(base)
    for mod in srt.modules():
        if isinstance(mod, MoE) and mod.impl == "auto":  # MoE layers only (MLA has an impl too)
            mod.impl = "sorted"
    variants.append(("fp32", srt, fdir / "model.safetensors", "sorted-moe", None))
    cals = args.calibrations.split(",")
    specs = [("int8", 0), ("w8a8", 0)] + [("int4", int(g)) for g in args.groups.split(",") if g]
    q = copy.deepcopy(base)  # int8 with a float embedding (format v1 layout): what the embedding costs
    spec = QuantSpec("int8", embed=False)
    rep = quantize_model(q, spec)
    d = save_quantized(q, work / "int8-fpemb", quant_config(q, spec, rep["modules"]), meta)
    fpemb = ("int8", q, d / "model.safetensors", "rtn-fpemb", None)
    for method, g in specs:
        for cal in cals:
            if method == "w8a8" and cal != "rtn":
                continue  # activations are quantized per token at run time: no weight smoothing search
            spec = QuantSpec(method, g or 128, "minmax" if cal == "rtn" else cal,
                             search="none" if cal == "rtn" else "awq")
            t = time.time()
            q = copy.deepcopy(base)
            rep = quantize_model(q, spec, None if cal == "rtn" else calib_x)
            name = method + (f"-g{g}" if g else "")
            d = save_quantized(q, work / f"{name}-{cal}", quant_config(q, spec, rep["modules"]), meta)
            tq = None
            if task:
                tq = copy.deepcopy(task[1])
                quantize_model(tq, spec, None if cal == "rtn" else task[3])
            variants.append((name, q, d / "model.safetensors", cal, tq))
            if name == "int8" and cal == "rtn":
                variants.append(fpemb)
            print(f"  quantized {name} {cal}: {time.time() - t:.1f}s, smoothed {rep['smoothed']} matrices, "
                  f"calib rel err {rep['err']:.3g} (rtn {rep['err_rtn']:.3g})", flush=True)
    if args.qat_steps:
        g = int(args.groups.split(",")[0])
        from tinyseek.data.loader import ShardLoader

        loader = ShardLoader(data, 8, T, 0, 1, args.device)
        q = copy.deepcopy(base)
        prepare_qat(q, "int4", g)
        t = time.time()
        losses = qat_finetune(q, loader.next_batch, args.qat_steps, lr=1e-4)
        kinds = convert_qat(q)
        spec = QuantSpec("int4", g, search="none")
        d = save_quantized(q, work / f"int4-g{g}-qat", quant_config(q, spec, kinds), meta)
        tq = None
        if task:
            tq = copy.deepcopy(task[1])
            prepare_qat(tq, "int4", g)
            qat_finetune(tq, iter_batches([(x[:, :-1], x[:, 1:]) for x in task[3]]), args.qat_steps, lr=1e-4)
            convert_qat(tq)
        variants.append((f"int4-g{g}", q, d / "model.safetensors", "qat", tq))
        print(f"  QAT int4-g{g}: {args.qat_steps} steps in {time.time() - t:.1f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        q = copy.deepcopy(base)  # W8A8 QAT: weights and activations fake-quantized, same data order
        prepare_qat(q, "w8a8")
        t = time.time()
        losses = qat_finetune(q, ShardLoader(data, 8, T, 0, 1, args.device).next_batch, args.qat_steps, lr=1e-4)
        kinds = convert_qat(q)
        d = save_quantized(q, work / "w8a8-qat", quant_config(q, QuantSpec("w8a8"), kinds), meta)
        w8a8_qat = ("w8a8", q, d / "model.safetensors", "qat", None)
        print(f"  QAT w8a8: {args.qat_steps} steps in {time.time() - t:.1f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        # control: the same fine-tune in fp32 (same data order), then plain RTN int4: separates the
        # gain of QAT from the gain of simply training the under-trained model for longer
        ft = copy.deepcopy(base)
        qat_finetune(ft, ShardLoader(data, 8, T, 0, 1, args.device).next_batch, args.qat_steps, lr=1e-4)
        ftq = copy.deepcopy(ft)
        rep = quantize_model(ftq, QuantSpec("int4", g, search="none"))
        fdir2 = work / "fp32-ft"
        fdir2.mkdir()
        save_weights(ft.state_dict(), fdir2 / "model.safetensors")
        d = save_quantized(ftq, work / f"int4-g{g}-ft-rtn", quant_config(ftq, QuantSpec("int4", g, search="none"),
                                                                          rep["modules"]), meta)
        tft = tftq = None
        if task:
            tft = copy.deepcopy(task[1])
            qat_finetune(tft, iter_batches([(x[:, :-1], x[:, 1:]) for x in task[3]]), args.qat_steps, lr=1e-4)
            tftq = copy.deepcopy(tft)
            quantize_model(tftq, QuantSpec("int4", g, search="none"))
        variants.append(("fp32", ft, fdir2 / "model.safetensors", "ft-ctrl", tft))
        variants.append((f"int4-g{g}", ftq, d / "model.safetensors", "ft+rtn", tftq))
        ftw = copy.deepcopy(ft)
        rep = quantize_model(ftw, QuantSpec("w8a8"))
        d = save_quantized(ftw, work / "w8a8-ft-rtn", quant_config(ftw, QuantSpec("w8a8"), rep["modules"]), meta)
        variants += [w8a8_qat, ("w8a8", ftw, d / "model.safetensors", "ft+rtn", None)]
    if args.torchao:
        t = time.time()
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        def ao(model):
            quantize_(model, Int8WeightOnlyConfig())
            for mod in model.modules():  # torchao's Int8Tensor weights cannot be read back as float
                if type(mod).__name__ == "MLA":  # matrices by the absorbed MLA decode: use the naive one
                    mod.impl = "naive"
            return model

        q = ao(copy.deepcopy(base))
        tq = ao(copy.deepcopy(task[1])) if task else None
        variants.append(("torchao-int8", q, None, "linears", tq))
        print(f"  torchao Int8WeightOnly: {time.time() - t:.1f}s (incl. import)")

    # ---- measure -----------------------------------------------------------------------
    from tinyseek.kernels import quant as kernels

    shipped = kernels.available() if args.device == "cpu" else False  # default settings
    print(f"  fused kernels as shipped: {'on' if shipped else 'off/unavailable'}")
    rows = []
    prompt = val[0][0][:1, :32]
    times: dict[tuple[int, bool], list[float]] = {}
    modes = [shipped] + ([False] if shipped and not args.no_plain else [])
    for i, (_, m, _, _, _) in enumerate(variants):
        decode_seconds(m, prompt, 8)  # warm-up
    for _ in range(args.rounds):
        for i, (name, m, _, _, _) in enumerate(variants):
            for k in modes:
                if k != shipped and (name == "fp32" or name == "torchao-int8"):
                    continue  # float models do not use the kernels: one column
                kernels.enable(k)
                times.setdefault((i, k), []).append(decode_seconds(m, prompt, args.decode_tokens))
    kernels.enable(shipped)
    f_bytes = weight_bytes(base)["total"]
    for i, (name, m, path, cal, tq) in enumerate(variants):
        if name == "torchao-int8":  # tensor subclasses: count the int8 data + scales it holds
            wb = {"total": sum(_ao_bytes(t) for t in m.state_dict().values()), "quantized": 0, "float": 0}
        else:
            wb = weight_bytes(m)
        rows.append({
            "model": name, "calib": cal,
            "file_mb": path.stat().st_size / 1e6 if path else float("nan"),
            "mem_mb": wb["total"] / 1e6,
            "part_x": (f_bytes - wb["float"]) / wb["quantized"] if wb["quantized"] else float("nan"),
            "ppl": perplexity(m, val),
            "tok_s": args.decode_tokens / statistics.median(times[(i, shipped)]),
            "tok_s_k": args.decode_tokens / statistics.median(times[(i, False)])
            if shipped and (i, False) in times else float("nan"),
            "acc": task_accuracy(tq, task[0], task[2]) if task and tq is not None else float("nan"),
            "fold_mb": _folded_bytes(m) / 1e6,
        })
    f = rows[0]
    head = (f"{'model':<13}{'calib':<11}{'file MB':>8}{'x':>6}{'mem MB':>8}{'x':>6}{'qpart x':>8}"
            f"{'ppl':>8}{'dppl %':>8}{'tok/s':>8}{'x':>6}{'plain':>8}{'x':>6}{'fold MB':>8}"
            + (f"{'task acc':>9}" if task else ""))
    print()
    print(f"checkpoint {step} | {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M params | "
          f"held-out {args.eval_batches}x8x{T} tokens | decode batch 1, {args.decode_tokens} tokens, "
          f"median of {args.rounds} | torch threads {torch.get_num_threads()}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<13}{r['calib']:<11}{r['file_mb']:>8.3f}{f['file_mb'] / r['file_mb']:>6.2f}"
              f"{r['mem_mb']:>8.3f}{f['mem_mb'] / r['mem_mb']:>6.2f}"
              f"{('' if math.isnan(r['part_x']) else format(r['part_x'], '.2f')):>8}"
              f"{r['ppl']:>8.4f}{100 * (r['ppl'] / f['ppl'] - 1):>+8.2f}{r['tok_s']:>8.1f}{r['tok_s'] / f['tok_s']:>6.2f}"
              f"{_fmt(r['tok_s_k'], '.1f'):>8}{_fmt(r['tok_s_k'] / f['tok_s'], '.2f'):>6}{r['fold_mb']:>8.3f}"
              + (f"{_fmt(r['acc'], '.3f'):>9}" if task else ""))


def _folded_bytes(model) -> int:
    """Bytes of the MLA decode weights folded after decoding (``MLA._folded``: float, built from the
    dequantised weights in quantized models; a decode-time cache, not in the checkpoint)."""
    total = 0
    for mod in model.modules():
        folded = getattr(mod, "_folded", None)
        if folded is not None:
            total += sum(w.numel() * w.element_size() for w in folded[1] if w is not None)
    return total


def _data_from_run_config(step: Path) -> Path | None:
    """The ``data`` shard folder named in the run's ``config.json`` (pipeline runs keep shards there)."""
    import json

    for run in (step.parent.parent, step.parent, step):
        cfg = run / "config.json"
        if cfg.is_file():
            d = json.loads(cfg.read_text()).get("data")
            for cand in ((Path(d), ROOT / d) if d else ()):
                if (cand / "index.json").is_file():
                    return cand
    return None


def _fmt(v: float, spec: str) -> str:
    return "" if math.isnan(v) else format(v, spec)


def _ao_bytes(t: torch.Tensor) -> int:
    """Bytes of a (possibly torchao tensor-subclass) tensor: sum over its inner plain tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_ao_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


if __name__ == "__main__":
    main()
