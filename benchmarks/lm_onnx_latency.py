"""A Llama-architecture causal LM in onnxruntime: file size and next-token latency of the weight-only 4-bit
group-wise export (Linear layers as com.microsoft.MatMulNBits) against the float32 ONNX of the same model.

The model is a ``LlamaForCausalLM`` built from a config with random weights (size and speed do not depend on the
trained values): by default hidden 2048, MLP 5632, 4 layers, 16 heads with 4 KV heads (grouped-query attention),
vocabulary 32000 (TinyLlama's shapes, 4 of its 22 layers). Variants, each written by
``torchsaq.export.causal_lm.export_causal_lm(model, path, kv_cache=True)``:

* ``float32``   -- ``quantized=False``: the float model;
* ``w4 gG``     -- ``saq.quantize(model, QuantConfig(w_bits=4, a_bits=None, group_size=G))``: every Linear
  (lm_head included, at ``first_last_bits`` = 4 here) as MatMulNBits, 4-bit codes in blocks of G, the token
  embedding left float32;
* ``w4 gG +emb`` -- the same with ``embedding_bits=4``: the embedding table as GatherBlockQuantized, 4-bit in
  blocks of G;
* ``... acc4``  -- the same file with ``nbits_accuracy_level=4``: MatMulNBits' ``accuracy_level`` 4, onnxruntime
  quantizes each MatMulNBits input to int8 per block and runs its integer kernel (faster, approximate: its
  error against PyTorch is in the last column). The other files compute the model's numbers (float activations).

Next-token latency: one ``session.run`` of the KV-cache graph for one new token per sequence (batch 1) after a
past of ``--past`` tokens (the past keys/values are inputs, the presents outputs): a decoding step. The variants
are interleaved in a shuffled order in each repetition; the median is reported. Every session is
``InferenceSession(path, so)`` with default options but ``intra_op_num_threads``. Parity: each file's logits for
that step against the PyTorch model's (relative max error) and the argmax agreement.

    python benchmarks/lm_onnx_latency.py          # writes benchmarks/results/lm_onnx_latency.{md,json}
    python benchmarks/lm_onnx_latency.py --hidden 1024 --intermediate 2816 --layers 2 --repeats 5 --out /tmp/lm
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_latency import cpu_name  # noqa: E402  (the machine's name, as the CNN latency table gives it)


def session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def build(args):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                   intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                   max_position_embeddings=max(2048, args.past + 8), tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def variants(args) -> list[tuple[str, dict, int]]:
    """(name, QuantConfig options, MatMulNBits accuracy_level) of each quantized variant."""
    out = []
    for g in args.groups:
        lin = dict(w_bits=4, a_bits=None, group_size=g, first_last_bits=4)
        out.append((f"w4 g{g}", lin, 0))
        if args.embeddings:
            out.append((f"w4 g{g} +emb", dict(lin, embedding_bits=4), 0))
            out.append((f"w4 g{g} +emb acc4", dict(lin, embedding_bits=4), 4))
        else:
            out.append((f"w4 g{g} acc4", lin, 4))
    return out


def export_all(folder: Path, args):
    """Write float32.onnx and one file per quantized variant; returns paths, export seconds, the decode feeds
    and each variant's PyTorch logits for them."""
    import torch

    import torchsaq as saq
    from torchsaq.export.causal_lm import export_causal_lm

    base = build(args)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, args.past + 1), generator=gen)
    with torch.no_grad():
        cache = base(input_ids=ids[:, :args.past], use_cache=True).past_key_values
    feeds = {"input_ids": ids[:, args.past:].numpy()}
    for i, layer in enumerate(cache.layers):
        feeds[f"past_key_values.{i}.key"] = layer.keys.numpy()
        feeds[f"past_key_values.{i}.value"] = layer.values.numpy()
    paths, seconds, refs = {}, {}, {}
    for name, opts, level in [("float32", None, 0), *variants(args)]:
        model = copy.deepcopy(base)
        saq.quantize(model, saq.QuantConfig(**(opts or variants(args)[0][1])))
        model.train()
        with torch.no_grad():
            model(input_ids=ids[:, :8])  # first forward: steps initialised from the weights
        model.eval()
        refs[name] = step_logits(base if opts is None else model, feeds, args.layers)  # the file's past
        path = folder / (name.replace(" ", "_").replace("+", "") + ".onnx")
        t = time.perf_counter()
        export_causal_lm(model, path, kv_cache=True, batch=1, length=1, past_length=4, quantized=opts is not None,
                         nbits_accuracy_level=level)
        seconds[name] = time.perf_counter() - t
        paths[name] = str(path)
        print(f"  exported {name} in {seconds[name]:.0f} s ({os.path.getsize(path) / 1e6:.1f} MB)", file=sys.stderr)
        del model
    return paths, seconds, feeds, refs


def step_logits(model, feeds, layers: int):
    """PyTorch's logits for the decoding step of ``feeds`` (the float model's past keys/values)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(layers):
        cache.update(torch.from_numpy(feeds[f"past_key_values.{i}.key"]).clone(),
                     torch.from_numpy(feeds[f"past_key_values.{i}.value"]).clone(), i)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(feeds["input_ids"]), cache=cache, use_cache=True).logits.numpy()


def kernels(path: str, folder: Path) -> str:
    """The matmul/gather kernels onnxruntime runs (from the optimized model it saves)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    wanted = ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits", "Gather", "GatherBlockQuantized", "DequantizeLinear")
    count = collections.Counter(n.op_type for n in onnx.load(str(folder / "optimized.onnx"),
                                                             load_external_data=False).graph.node
                                if n.op_type in wanted)
    os.remove(folder / "optimized.onnx")
    return ", ".join(f"{k} {v}" for k, v in sorted(count.items()))


def time_variants(paths: dict[str, str], feeds, threads: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median / min / max ms of one decoding step per variant, the variants interleaved in a shuffled order."""
    sessions = {v: session(p, threads) for v, p in paths.items()}
    for v in paths:  # warm-up
        for _ in range(3):
            sessions[v].run(None, feeds)
    times: dict[str, list[float]] = {v: [] for v in paths}
    order = list(paths)
    for r in range(repeats):
        random.Random(r + 1000 * threads).shuffle(order)
        for v in order:
            t = time.perf_counter()
            sessions[v].run(None, feeds)
            times[v].append(1000 * (time.perf_counter() - t))
    return {v: {"median": statistics.median(t), "min": min(t), "max": max(t)} for v, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--groups", type=int, nargs="+", default=[32, 128])
    p.add_argument("--no-embeddings", dest="embeddings", action="store_false",
                   help="skip the variants with a 4-bit embedding table")
    p.add_argument("--past", type=int, default=128, help="tokens already in the KV cache")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=30, help="timed decoding steps per variant and thread count")
    p.add_argument("--out", default="benchmarks/results/lm_onnx_latency", help="writes OUT.md and OUT.json")
    args = p.parse_args()

    import numpy as np
    import onnxruntime as ort

    import torchsaq as saq

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths, seconds, feeds, refs = export_all(folder, args)
        sizes = {v: os.path.getsize(pth) for v, pth in paths.items()}
        ops = {v: kernels(pth, folder) for v, pth in paths.items()}
        parity = {}
        for v, pth in paths.items():
            got = session(pth, 1).run(None, feeds)[0]
            ref = refs[v]
            parity[v] = {"rel_max_err": float(np.abs(got - ref).max() / np.abs(ref).max()),
                         "argmax_same": bool((got.argmax(-1) == ref.argmax(-1)).all())}
        med = {}
        for t in args.threads:
            med[t] = time_variants(paths, feeds, t, args.repeats)
            print(f"  {t} thread(s) done", file=sys.stderr)
    load_after = os.getloadavg()[0]
    n_params = sum(p.numel() for p in build(args).parameters())
    rows = []
    for v in paths:
        row = {"variant": v, "file_mb": sizes[v] / 1e6, "smaller_than_float": sizes["float32"] / sizes[v],
               "export_s": seconds[v], "kernels": ops[v], **parity[v]}
        for t in args.threads:
            row[f"ms_{t}t"] = med[t][v]["median"]
            row[f"ms_{t}t_min"] = med[t][v]["min"]
            row[f"speedup_{t}t"] = med[t]["float32"]["median"] / med[t][v]["median"]
        rows.append(row)
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx", "amx"))}
                   if os.path.exists("/proc/cpuinfo") else [])
    command = " ".join(["python benchmarks/lm_onnx_latency.py", *sys.argv[1:]])
    env = (f"onnxruntime {ort.__version__} CPUExecutionProvider, default session options but the intra-op thread "
           f"count; {cpu_name()} ({' '.join(flags)}), {os.cpu_count()} cores; load average {load_before:.1f} before, "
           f"{load_after:.1f} after; saq {saq.__version__}, python {platform.python_version()}")
    model = (f"LlamaForCausalLM, random weights: hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, "
             f"{args.heads} heads / {args.kv_heads} KV heads, vocabulary {args.vocab} ({n_params / 1e6:.0f}M "
             f"parameters, untied embeddings)")
    what = (f"next-token latency = one session.run of the KV-cache graph: 1 new token, batch 1, {args.past} past "
            f"tokens; median of {args.repeats} interleaved runs per variant and thread count")
    head = ["variant", "file MB", "float / variant size"]
    head += [f"ms {t}t" for t in args.threads] + [f"float / variant speed {t}t" for t in args.threads]
    head += ["logits vs PyTorch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["variant"], f"{r['file_mb']:.1f}", f"{r['smaller_than_float']:.2f}x"]
        cells += [f"{r[f'ms_{t}t']:.1f}" for t in args.threads]
        cells += [f"{r[f'speedup_{t}t']:.2f}x" for t in args.threads]
        cells += [f"{r['rel_max_err']:.1e}, argmax {'same' if r['argmax_same'] else 'differs'}"]
        lines.append("| " + " | ".join(cells) + " |")
    kern = "".join(f"- {r['variant']}: kernels run: {r['kernels']}\n" for r in rows)
    text = (f"# Llama-architecture LM in onnxruntime: 4-bit MatMulNBits against float32\n\n{model}.\n\n{what}.\n\n"
            f"{env}\n\n    {command}\n\n" + "\n".join(lines) + "\n\n" + kern)
    print(text)
    from torchsaq._io import atomic_write_text

    atomic_write_text(args.out + ".md", text)
    atomic_write_text(args.out + ".json", json.dumps({"model": model, "latency": what, "environment": env,
                                                       "command": command, "args": vars(args), "rows": rows},
                                                      indent=2) + "\n")


if __name__ == "__main__":
    main()
