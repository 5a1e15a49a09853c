"""Perplexity of a small Llama LM under weight-only group-wise QAT: does SAQ beat plain QAT (and PTQ)? Fully offline.

Protocol (issue 24, item 3):

- Corpus: the Python standard library's own source (``sysconfig.get_paths()["stdlib"]``, every ``*.py`` file, sorted,
  outside ``test``/``tests``/``idle_test``/``site-packages`` folders). Each file goes to train / validation / test by
  a hash of its relative path (sha256, bucket = first 8 hex digits mod 100: 0-4 test, 5-9 validation, else train),
  so the split never depends on the file order and a file present in two Python versions lands in the same split.
  The stdlib differs between Python versions: the report names the version and the sha256 of the token stream, and
  every cached run is keyed by that hash (runs over another corpus never mix).
- Tokenizer: byte-level BPE (HF ``tokenizers``, vocabulary 4096, trained on the train split only, files separated by
  ``<|endoftext|>``), trained twice and compared (the data preparation fails if two trainings differ), cached with
  the token arrays in ``<out>/lm_ppl_data<tag>/``.
- Model: ``LlamaForCausalLM`` (``--width`` 128: hidden 128, 4 layers, 4 heads, MLP 384, context 128, untied
  embeddings, 1.90M parameters of which 1.05M in the embedding and the LM head; ``--width 256``: MLP 768, 5.51M),
  pretrained in float with AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, linear warm-up, cosine to 10%, clip
  1.0), batch 16 x 128 random windows of the train split drawn from a generator seeded by (seed, step): a resumed
  run sees the same batches. One float model per seed, checkpointed in ``<out>/lm_ppl_float<tag>/seed<N>/``
  (``float.pt`` only when finished; ``partial.pt`` every 100 steps, which a re-run resumes and never uses as the
  finished model).
- From each seed's float model, weight-only at 4, 3, 2 bits, a step per group of 32 or 128 inputs (LSQ), every
  decoder Linear at those bits, ``lm_head`` at 8 bits (same groups), the token embeddings float:
  ``PTQ (RTN)``: quantize, set each group's step by LSQ's init (2 mean|w| / sqrt(Qp)), round to nearest, no
  training; ``QAT (LSQ)``: fine-tune weights and steps with AdamW (warm-up, cosine); ``SAQ full`` / ``SAQ
  prev_grad``: the same with ``saq.SAQ(mode="case3")`` around the same AdamW, same batches (paired seeds).
- rho per SAQ method from ``--rhos`` on the validation split (sweep seed 1000, its own float model, at
  ``--sweep-bits`` and the first group; other bit-widths take the nearest swept one's rho); results on the test
  split. Perplexity = exp(mean next-token NLL) over ``--eval-windows`` non-overlapping context windows spread evenly
  over the split.
- Report ``<out>/lm_ppl<tag>.{md,json}``: validation / test perplexity mean +- sd, paired gain (ppl of the reference
  minus ppl of the method: > 0 is better) over plain QAT and over PTQ with 95% t-intervals, the share of PTQ's
  degradation recovered (ppl_PTQ - ppl) / (ppl_PTQ - ppl_float) per seed (torchao's headline metric), s/run.
  Runs are cached in ``<out>/lm_ppl_runs<tag>.jsonl``: an interrupted study resumes.

    python benchmarks/lm_ppl.py                    # the study (defaults below), 2 worker processes, one thread each
    python benchmarks/lm_ppl.py --smoke --out /tmp/lm   # tiny model and corpus sizes: the pipeline in < 1 min
    python benchmarks/lm_ppl.py --report-only      # tables from the cached runs

Sizes. Measured here (AMD EPYC, 2 cores; one thread, with the fashion study's 2 worker processes running beside it,
so ~2/3 of a core: a 2048x256x768 fp32 matmul ran at 20 GFLOP/s), at batch 16 x 128 tokens, w2 g32 for fine-tuning:

    | width | params | pretrain steps/s | QAT steps/s | SAQ full | SAQ prev_grad | eval, 128 windows (float) |
    | 256   | 5.51M  | 0.19 (12 in 63 s)| 0.17        | 0.09     | 0.22          | 28 s                      |
    | 128   | 1.90M  | 0.65 (30 in 46 s)| 0.56        | 0.28     | 0.58          | 2.9 s (quantized ~4 s)    |

The example width 256 would give ~115 pretraining steps (235k tokens, 0.07 of an epoch) in 10 minutes and ~15
fine-tuning steps per 1-2 minute run: too few to train or fine-tune anything. Width 128 is ~3.4x cheaper per token
(and nearer the compute-optimal size for this budget, ~0.3M parameters by C = 6ND with D = 20N), so it is the
default: 400 pretraining steps = ~10 min (820k tokens, 0.26 epoch of the 3.17M-token train split), 40 fine-tuning
steps (82k tokens) = QAT ~70 s + ~20 s evaluation, SAQ full ~145 s + 20 s, prev_grad ~70 s + 20 s, PTQ ~20 s.
Data preparation (tokenizer trained twice, the corpus encoded): 55 s once. Per seed: ~11 min float + 6 cells x
~6 min + the float fine-tune control ~1.5 min = ~49 CPU-minutes; the rho sweep (its own float model, the probe,
2 bit-widths x 2 SAQ methods x 4 rhos) ~46 CPU-minutes. 5 seeds: ~4.9 CPU-hours, ~2.5 h on 2 workers (3 seeds:
~3 CPU-hours). These are contended figures: on an idle core every run is ~1.5x faster. Python 3.11.7's stdlib: 734
files (663/33/38), 12.1M characters, 3,172,026/134,185/179,211 tokens, token stream sha256 6ded454927e9fe49.

rho for AdamW: SAM's perturbation e = rho g / ||g|| comes from the raw gradient whatever the base optimizer, so its
first-order loss rise is rho ||g|| (||g|| ~ 1 here, clipped at 1 in the update), while one AdamW step moves the
weights by ~lr sqrt(parameters) ~ 0.7 at lr 5e-4: rho 0.01-0.1 perturbs far less than one update moves, and raises
the loss by ~0.01-0.1 nats. The sweep reports that rise per rho (the probe), measured on the sweep seed's model.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy import Runner, t_interval  # noqa: E402  (the cached process pool and the paired interval)

EOS = "<|endoftext|>"
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
SWEEP_SEED = 1000

# the study's sizes (MEASURED in the module docstring); --smoke replaces them by SMOKE's, --width sets the model's
WIDTHS = {w: dict(hidden_size=w, intermediate_size=3 * w, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4) for w in (128, 256)}
STUDY: dict[str, Any] = dict(
    vocab=4096, model=WIDTHS[128], context=128, batch=16, pretrain_steps=400, pretrain_lr=2e-3, pretrain_warmup=40,
    weight_decay=0.1, finetune_steps=40, finetune_lr=5e-4, finetune_warmup=4, head_bits=8, eval_windows=256,
    probe_batches=4, rhos=[0.01, 0.02, 0.05, 0.1], sweep_bits=[4, 2], bits=[4, 3, 2], groups=[32, 128])
SMOKE: dict[str, Any] = dict(
    vocab=320, model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2),
    context=32, batch=8, pretrain_steps=40, pretrain_lr=3e-3, pretrain_warmup=5, weight_decay=0.1,
    finetune_steps=4, finetune_lr=5e-4, finetune_warmup=1, head_bits=8, eval_windows=16,
    probe_batches=2, rhos=[0.05, 0.1], sweep_bits=[2], bits=[2], groups=[32])

PTQ, BASE = "PTQ (RTN)", "QAT (LSQ)"
METHODS: dict[str, dict[str, Any]] = {  # method -> how it fine-tunes (None: no training)
    PTQ: dict(train=False),
    BASE: dict(train=True, sharpness=None),
    "SAQ full": dict(train=True, sharpness="case3", strategy="full"),
    "SAQ prev_grad": dict(train=True, sharpness="case3", strategy="prev_grad"),
}


# --- corpus and tokenizer ------------------------------------------------------------------------------------------

def split_of(rel: str) -> str:
    """train / validation / test from a hash of the file's relative path (never from the order of the files)."""
    bucket = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < 5 else "validation" if bucket < 10 else "train"


def corpus_files(root: Path, sample: int = 1) -> list[tuple[str, str]]:
    """(relative posix path, text) of every ``*.py`` under ``root`` outside the excluded folders, sorted; ``sample``
    N > 1 keeps one file in N, chosen by another hash of the path (the smoke run's small corpus)."""
    out = []
    for p in sorted(root.rglob("*.py"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root)
        if set(rel.parts[:-1]) & EXCLUDED_DIRS or not p.is_file():
            continue
        if sample > 1 and int(hashlib.sha256(b"sample:" + rel.as_posix().encode()).hexdigest()[:8], 16) % sample:
            continue
        try:
            out.append((rel.as_posix(), p.read_bytes().decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return out


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def prepare_data(root: Path, folder: Path, vocab: int, sample: int = 1) -> dict[str, Any]:
    """Tokenizer and token arrays of the three splits, cached in ``folder`` (``meta.json`` written last: its
    presence with the same corpus fingerprint and vocabulary means the cache is whole)."""
    import numpy as np

    files = corpus_files(root, sample)
    fp = hashlib.sha256()
    for rel, text in files:
        fp.update(rel.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp.hexdigest() and meta.get("vocab") == vocab and all(
                (folder / f"{s}.npy").exists() for s in ("train", "validation", "test")):
            return meta
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}
    for rel, text in files:
        splits[split_of(rel)].append((rel, text))
    empty = [s for s, v in splits.items() if not v]
    if empty:
        raise SystemExit(f"lm_ppl: no file of {root} falls in the {', '.join(empty)} split ({len(files)} files)")
    t0 = time.perf_counter()
    tok = train_tokenizer([t for _, t in splits["train"]], vocab)
    again = train_tokenizer([t for _, t in splits["train"]], vocab)
    if tok.to_str() != again.to_str():
        raise RuntimeError("lm_ppl: two trainings of the tokenizer on the same texts differ")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    stream = hashlib.sha256()
    tokens = {}
    for s, items in splits.items():
        ids: list[int] = []
        for enc in tok.encode_batch([t for _, t in items]):
            ids.extend(enc.ids)
            ids.append(eos)
        arr = np.asarray(ids, dtype=np.uint16)
        np.save(folder / f"{s}.npy", arr)
        stream.update(arr.tobytes())
        tokens[s] = len(arr)
    meta = dict(root=str(root), python=sys.version.split()[0], fingerprint=fp.hexdigest(), vocab=vocab,
                vocab_actual=tok.get_vocab_size(), files={s: len(v) for s, v in splits.items()},
                chars={s: sum(len(t) for _, t in v) for s, v in splits.items()}, tokens=tokens,
                token_sha256=stream.hexdigest(), tokenizer_sha256=hashlib.sha256(tok.to_str().encode()).hexdigest(),
                tokenizer_deterministic=True, prepare_s=round(time.perf_counter() - t0, 1))
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return meta


# --- model, batches, perplexity ------------------------------------------------------------------------------------

def build_model(cfg: dict[str, Any]) -> Any:
    import torch
    import transformers

    torch.manual_seed(cfg["seed"])
    lc = transformers.LlamaConfig(vocab_size=cfg["vocab"], max_position_embeddings=cfg["context"],
                                  tie_word_embeddings=False, **cfg["model"])
    return transformers.LlamaForCausalLM(lc).float()


def _tokens(cfg: dict[str, Any], split: str) -> Any:
    import numpy as np

    return np.load(Path(cfg["data_dir"]) / f"{split}.npy")


def train_batch(tokens: Any, cfg: dict[str, Any], stream: int, step: int) -> Any:
    """Random windows of the train split, from a generator seeded by (seed, stream, step): resumable, and the same
    batches for every method of a seed (``stream`` 0: pretraining, 1: fine-tuning)."""
    import numpy as np
    import torch

    rng = np.random.default_rng([cfg["seed"], stream, step])
    starts = rng.integers(0, len(tokens) - cfg["context"], size=cfg["batch"])
    return torch.from_numpy(np.stack([tokens[s:s + cfg["context"]] for s in starts]).astype(np.int64))


def finetune_batch(tokens: Any, cfg: dict[str, Any], step: int) -> Any:
    """The fine-tune's batch of ``step``: random windows of the train split (:func:`train_batch`, stream 1), or with
    ``finetune_subset`` N the over-fitting regime: a fixed pool of N windows of the seed (drawn once), visited in
    a new order every epoch of ``N / batch`` steps (N a multiple of the batch)."""
    n = cfg.get("finetune_subset")
    if not n:
        return train_batch(tokens, cfg, 1, step)
    import numpy as np
    import torch

    starts = np.random.default_rng([cfg["seed"], 2]).integers(0, len(tokens) - cfg["context"], size=n)
    per_epoch = n // cfg["batch"]
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([cfg["seed"], 3, epoch]).permutation(n)
    pick = starts[order[k * cfg["batch"]:(k + 1) * cfg["batch"]]]
    return torch.from_numpy(np.stack([tokens[s:s + cfg["context"]] for s in pick]).astype(np.int64))


def eval_windows(tokens: Any, context: int, n: int) -> Any:
    """``n`` non-overlapping windows spread evenly over the split (all of them if it has fewer)."""
    import numpy as np
    import torch

    total = len(tokens) // context
    idx = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int))
    return torch.from_numpy(np.stack([tokens[i * context:(i + 1) * context] for i in idx]).astype(np.int64))


def perplexity(model: Any, windows: Any, batch: int = 32) -> float:
    import torch

    was = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = windows[i:i + batch]
            total += float(model(input_ids=x, labels=x).loss) * len(x)
    model.train(was)
    return math.exp(total / len(windows))


def _evaluate(model: Any, cfg: dict[str, Any]) -> dict[str, float]:
    return {f"{s}_ppl": perplexity(model, eval_windows(_tokens(cfg, s), cfg["context"], cfg["eval_windows"]))
            for s in ("validation", "test")}


def _optimizer(model: Any, lr: float, weight_decay: float, warmup: int, steps: int) -> tuple[Any, Any]:
    """AdamW (decay on matrices only, never on norms or quantizer steps) and linear warm-up + cosine to 10%."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)],
                            lr=lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def float_complete(cfg: dict[str, Any]) -> bool:
    """The float checkpoint exists and was written at the end of a run of this configuration's length (a run cut
    off leaves only ``partial.pt``, which is never taken for the finished model)."""
    import torch

    path = Path(cfg["checkpoint"])
    if not path.exists():
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state["step"]) == int(cfg["pretrain_steps"]) and state["arch"] == _arch(cfg)


def _arch(cfg: dict[str, Any]) -> str:
    return json.dumps({k: cfg[k] for k in ("vocab", "model", "context", "seed", "data")}, sort_keys=True)


# --- the two kinds of run ------------------------------------------------------------------------------------------

def pretrain(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume, or load) the float model of ``cfg`` and evaluate it."""
    import torch

    path = Path(cfg["checkpoint"])
    partial = path.with_name("partial.pt")
    model = build_model(cfg)
    steps, start, losses = cfg["pretrain_steps"], 0, []
    t0 = time.perf_counter()
    if float_complete(cfg):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        start = steps
    else:
        opt, sched = _optimizer(model, cfg["pretrain_lr"], cfg["weight_decay"], cfg["pretrain_warmup"], steps)
        if partial.exists():
            state = torch.load(partial, map_location="cpu", weights_only=False)
            if state["arch"] == _arch(cfg) and state["steps"] == steps:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["opt"])
                sched.load_state_dict(state["sched"])
                start, losses = int(state["step"]), list(state["losses"])
        train = _tokens(cfg, "train")
        model.train()
        for step in range(start, steps):
            x = train_batch(train, cfg, 0, step)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            done = step + 1
            if done % cfg["log_every"] == 0 or done == steps:
                el = time.perf_counter() - t0
                print(f"  float seed {cfg['seed']}: step {done}/{steps} loss {statistics.fmean(losses[-50:]):.3f} "
                      f"({(done - start) / el:.2f} steps/s)", flush=True)
            if done % cfg["save_every"] == 0 and done < steps:
                _atomic_save(dict(arch=_arch(cfg), steps=steps, step=done, model=model.state_dict(),
                                  opt=opt.state_dict(), sched=sched.state_dict(), losses=losses), partial)
        _atomic_save(dict(arch=_arch(cfg), step=steps, model=model.state_dict()), path)
        partial.unlink(missing_ok=True)
    train_s = time.perf_counter() - t0
    res = _evaluate(model, cfg)
    return dict(res, train_loss=statistics.fmean(losses[-50:]) if losses else None, trained_steps=steps - start,
                train_s=train_s, steps_per_s=(steps - start) / train_s if steps > start else None)


def _quantized(cfg: dict[str, Any]) -> Any:
    """The seed's float model, quantized weight-only (decoder Linears at ``bits``, ``lm_head`` at ``head_bits``,
    ``group``-wise steps, embeddings float) with every step set by LSQ's initialisation; ``bits`` 32: left float
    (the control: the same fine-tune without quantization)."""
    import torch

    import torchsaq as saq

    if not float_complete(cfg):  # never fine-tune a float run that was cut off
        raise RuntimeError(f"{cfg['checkpoint']} is not a finished float model of this configuration")
    model = build_model(cfg)
    model.load_state_dict(torch.load(cfg["checkpoint"], map_location="cpu", weights_only=True)["model"])
    b = cfg["bits"]
    if b == 32:
        return model
    saq.quantize(model, saq.QuantConfig(w_bits=b, a_bits=None, first_last_bits=b, group_size=cfg["group"],
                                        layer_bits={"lm_head": (cfg["head_bits"], 32)}))
    saq.calibrate(model, [train_batch(_tokens(cfg, "train"), cfg, 2, 0)])  # traces; weight steps from the weights
    return model


def finetune(cfg: dict[str, Any]) -> dict[str, Any]:
    """PTQ (evaluate the quantized model as initialised) or QAT / SAQ fine-tuning, then evaluate."""
    import torch

    import torchsaq as saq

    model = _quantized(cfg)
    spec = METHODS[cfg["method"]]
    t0 = time.perf_counter()
    losses: list[float] = []
    if spec["train"]:
        steps = cfg["finetune_steps"]
        base, sched = _optimizer(model, cfg["finetune_lr"], 0.0, cfg["finetune_warmup"], steps)
        opt: Any = base
        if spec["sharpness"]:
            opt = saq.SAQ(model, base, rho=cfg["rho"], mode=spec["sharpness"], strategy=spec["strategy"],
                          max_grad_norm=1.0)
        train = _tokens(cfg, "train")
        model.train()
        for step in range(steps):
            x = finetune_batch(train, cfg, step)

            def closure() -> Any:
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                return loss.detach()

            if spec["sharpness"]:
                loss = opt.step(closure)
            else:
                loss = closure()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
    train_s = time.perf_counter() - t0
    res = _evaluate(model, cfg)
    return dict(res, train_loss=statistics.fmean(losses[-20:]) if losses else None,
                first_loss=losses[0] if losses else None, train_s=train_s)


def rho_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """What rho means on these weights: the loss rise of SAQ's case-3 ascent at each rho (its perturbed pass minus
    its first pass, same batch; the base optimizer has lr 0 so nothing moves), beside the gradient's norm (the first-
    order rise is rho ||g||) and the norm of one AdamW update at the fine-tune lr (~ lr sqrt(parameters))."""
    import torch

    import torchsaq as saq

    model = _quantized(cfg)
    model.train()
    train = _tokens(cfg, "train")
    batches = [train_batch(train, cfg, 3, i) for i in range(cfg["probe_batches"])]
    rise: dict[str, float] = {}
    norms: list[float] = []
    for rho in cfg["rhos"]:
        opt = saq.SAQ(model, torch.optim.SGD(model.parameters(), lr=0.0), rho=rho, mode="case3", strategy="full")
        rises = []
        for x in batches:
            seen: list[float] = []

            def closure() -> Any:
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                if not seen:
                    norms.append(float(torch.linalg.vector_norm(torch.stack(
                        [torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]))))
                seen.append(float(loss.detach()))
                return loss.detach()

            opt.step(closure)
            opt.zero_grad(set_to_none=True)
            rises.append(seen[1] - seen[0])
        rise[str(rho)] = statistics.fmean(rises)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(loss_rise=rise, grad_norm=statistics.fmean(norms), adamw_update_norm=cfg["finetune_lr"] * n ** 0.5)


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One run in a worker process (one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        kind = job["config"]["kind"]
        res = (pretrain if kind == "float" else rho_probe if kind == "probe" else finetune)(job["config"])
        return {"job": job, "result": res, "time_s": time.perf_counter() - t0}
    finally:
        torch.set_num_threads(threads)


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration as the cache knows it: no absolute paths (the corpus is identified by its token hash)."""
    out = {k: v for k, v in config.items() if k not in ("data_dir", "log_every", "save_every")}
    if "checkpoint" in out:
        out["checkpoint"] = f"<float>/seed{config['seed']}"
    return out


# --- the study -----------------------------------------------------------------------------------------------------

def _common(args: argparse.Namespace, meta: dict[str, Any], seed: int) -> dict[str, Any]:
    p = args.preset
    return dict(seed=seed, data=meta["token_sha256"][:16], data_dir=str(args.data_dir), vocab=meta["vocab_actual"],
                model=dict(p["model"]), context=p["context"], batch=p["batch"], weight_decay=p["weight_decay"],
                pretrain_steps=args.pretrain_steps, pretrain_lr=p["pretrain_lr"], pretrain_warmup=p["pretrain_warmup"],
                eval_windows=args.eval_windows,
                checkpoint=str(Path(args.float_dir, f"seed{seed}", "float.pt")))


def float_config(args: argparse.Namespace, meta: dict[str, Any], seed: int) -> dict[str, Any]:
    return dict(_common(args, meta, seed), kind="float", log_every=args.log_every, save_every=100)


def quant_config(args: argparse.Namespace, meta: dict[str, Any], seed: int, method: str, bits: int, group: int,
                 rho: Optional[float]) -> dict[str, Any]:
    p = args.preset
    cfg = dict(_common(args, meta, seed), kind="quant", method=method, bits=bits, group=group,
               head_bits=p["head_bits"])
    if METHODS[method]["train"]:
        cfg.update(finetune_steps=args.finetune_steps, finetune_lr=p["finetune_lr"],
                   finetune_warmup=max(1, round(p["finetune_warmup"] * args.finetune_steps / p["finetune_steps"])))
        if args.finetune_subset:  # (only when set: the cached runs of the main study keep their keys)
            cfg["finetune_subset"] = args.finetune_subset
    if METHODS[method].get("sharpness"):
        cfg["rho"] = rho
    return cfg


def _floats(args: argparse.Namespace, runner: Runner, meta: dict[str, Any], seeds: list[int]) -> dict[int, Any]:
    """The float model of each seed (trained, resumed or cached); a cached record whose checkpoint is gone or
    unfinished is trained again."""
    cfgs = [float_config(args, meta, s) for s in seeds]
    if not args.report_only:
        for c in cfgs:
            if not float_complete(c):
                runner.done.pop(runner.key(c), None)
    recs = runner.run(cfgs, "float models")
    return {s: r for s, r in zip(seeds, recs) if r is not None}


def _sweep(args: argparse.Namespace, runner: Runner, meta: dict[str, Any]) -> tuple[dict, dict]:
    """rho per (bits, SAQ method) by validation perplexity at the sweep seed; other bit-widths take the nearest."""
    swept = [m for m in args.methods if METHODS[m].get("sharpness")]
    if not swept:
        return {}, {}
    sweep_bits = [b for b in args.sweep_bits if b in args.bits] or args.bits
    g = args.groups[0]
    if len(args.rhos) == 1:
        return {(b, m): args.rhos[0] for b in args.bits for m in swept}, {}
    _floats(args, runner, meta, [SWEEP_SEED])
    probes = runner.run([dict(quant_config(args, meta, SWEEP_SEED, BASE, b, g, None), kind="probe", method="probe",
                              rhos=args.rhos, probe_batches=args.preset["probe_batches"]) for b in sweep_bits],
                        "rho probe (loss rise of the ascent)")
    args.probes = {b: r["result"] for b, r in zip(sweep_bits, probes) if r is not None}
    index = [(b, m, r) for b in sweep_bits for m in swept for r in args.rhos]
    recs = runner.run([quant_config(args, meta, SWEEP_SEED, m, b, g, r) for b, m, r in index],
                      f"rho sweep (validation, seed {SWEEP_SEED}, group {g})")
    val: dict[tuple[int, str], dict[float, float]] = {}
    for (b, m, r), rec in zip(index, recs):
        if rec is not None:
            val.setdefault((b, m), {})[r] = rec["result"]["validation_ppl"]
    chosen = {k: min(v, key=lambda r: (v[r], r)) for k, v in val.items()}
    for b in args.bits:
        for m in swept:
            near = min(sweep_bits, key=lambda x: (abs(x - b), x))
            if (near, m) in chosen:
                chosen.setdefault((b, m), chosen[(near, m)])
    return chosen, val


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    args.data_dir = out / f"lm_ppl_data{'_smoke' if args.smoke else ''}"  # the corpus: any width
    args.float_dir = str(out / f"lm_ppl_float{args.tag}")
    t_start = time.perf_counter()
    root = Path(args.corpus_dir or sysconfig.get_paths()["stdlib"]).resolve()
    meta = (json.loads((args.data_dir / "meta.json").read_text()) if args.report_only
            else prepare_data(root, args.data_dir, args.preset["vocab"], args.corpus_sample))
    print(f"corpus {meta['root']} (Python {meta['python']}): files {meta['files']}, tokens {meta['tokens']}, "
          f"token stream sha256 {meta['token_sha256'][:16]}", flush=True)
    runner = Runner(out / f"lm_ppl_runs{args.tag}.jsonl", args.workers, job=_run, normalize=_portable)
    if args.report_only:
        runner.run = lambda configs, label: [runner.done.get(runner.key(c)) for c in configs]  # type: ignore
    seeds = list(range(args.seeds))
    floats = _floats(args, runner, meta, seeds)
    chosen, val = _sweep(args, runner, meta)
    index = [(s, b, g, m) for s in seeds for b in args.bits for g in args.groups for m in args.methods]
    control = [quant_config(args, meta, s, BASE, 32, 0, None) for s in seeds] if BASE in args.methods else []
    recs = runner.run([quant_config(args, meta, s, m, b, g, chosen.get((b, m))) for s, b, g, m in index] + control,
                      "final runs (test split)")
    results = {k: r for k, r in zip(index, recs) if r is not None}
    args.control = {c["seed"]: r["result"] for c, r in zip(control, recs[len(index):]) if r is not None}
    report(args, argv, meta, floats, results, chosen, val, t_start)
    return 0


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=0, help="paired seeds of the final runs (0..N-1); default 5, "
                    "1 with --smoke")
    ap.add_argument("--bits", nargs="+", type=int, default=None, help=f"default {STUDY['bits']}")
    ap.add_argument("--groups", nargs="+", type=int, default=None,
                    help=f"default {STUDY['groups']}; the first is the one swept")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--rhos", nargs="+", type=float, default=None, help=f"default {STUDY['rhos']}")
    ap.add_argument("--sweep-bits", nargs="+", type=int, default=None, help=f"default {STUDY['sweep_bits']}")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes (one thread each); 0 runs in this process")
    ap.add_argument("--pretrain-steps", type=int, default=0, help=f"default {STUDY['pretrain_steps']}")
    ap.add_argument("--finetune-steps", type=int, default=0, help=f"default {STUDY['finetune_steps']}")
    ap.add_argument("--eval-windows", type=int, default=0, help=f"default {STUDY['eval_windows']}")
    ap.add_argument("--finetune-subset", type=int, default=0, metavar="N",
                    help="the over-fitting regime: fine-tune on a fixed pool of N windows of the train split (a "
                         "multiple of the batch), many epochs of it, instead of fresh windows every step")
    ap.add_argument("--report", default=None, help="report file name under --out (default lm_ppl<tag>)")
    ap.add_argument("--width", type=int, choices=sorted(WIDTHS), default=128,
                    help="hidden size (MLP 3x, 4 layers, 4 heads); 256 is ~3.4x slower per token")
    ap.add_argument("--corpus-dir", default=None, help="default: this Python's stdlib")
    ap.add_argument("--corpus-sample", type=int, default=0,
                    help="keep one file in N (by a hash of its path); default 1, 10 with --smoke on the stdlib")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--log-every", type=int, default=100, help="pretraining progress every N steps")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: the whole pipeline in < 1 min")
    ap.add_argument("--report-only", action="store_true", help="train nothing: tables from the cached runs")
    args = ap.parse_args(argv)
    args.preset = SMOKE if args.smoke else dict(STUDY, model=WIDTHS[args.width])
    args.tag = "_smoke" if args.smoke else "" if args.width == 128 else f"_w{args.width}"
    args.seeds = args.seeds or (1 if args.smoke else 5)
    args.rhos = args.rhos or args.preset["rhos"]
    args.bits = args.bits or args.preset["bits"]
    args.groups = args.groups or args.preset["groups"]
    args.sweep_bits = args.sweep_bits or args.preset["sweep_bits"]
    args.pretrain_steps = args.pretrain_steps or args.preset["pretrain_steps"]
    args.finetune_steps = args.finetune_steps or args.preset["finetune_steps"]
    args.eval_windows = args.eval_windows or args.preset["eval_windows"]
    args.corpus_sample = args.corpus_sample or (10 if args.smoke and not args.corpus_dir else 1)
    if args.smoke and args.log_every == 100:
        args.log_every = 20
    if args.finetune_subset and (args.finetune_subset < 0 or args.finetune_subset % args.preset["batch"]):
        ap.error(f"--finetune-subset must be a positive multiple of the batch ({args.preset['batch']}), got "
                 f"{args.finetune_subset}")
    args.report = args.report or f"lm_ppl{args.tag}"
    return args


# --- report --------------------------------------------------------------------------------------------------------

def _ms(vals: list[float]) -> str:
    if not vals:
        return "n/a"
    return f"{statistics.fmean(vals):.2f} +- {statistics.stdev(vals) if len(vals) > 1 else 0.0:.2f}"


def _ci(diffs: list[float], fmt: str = "{:+.2f}") -> tuple[str, Optional[list[float]]]:
    if not diffs:
        return "-", None
    m, hw = t_interval(diffs)
    return (f"{fmt.format(m)} [{fmt.format(m - hw)}, {fmt.format(m + hw)}]" if math.isfinite(hw)
            else fmt.format(m)), [m, hw, len(diffs)]


def _cell_rows(args: argparse.Namespace, fl: dict[int, float], results: dict, chosen: dict, b: int,
               g: int) -> tuple[list[str], list[dict[str, Any]]]:
    """The table lines and JSON rows of one (bits, group) cell."""
    lines, rows = [], []
    test = {m: {s: r["result"]["test_ppl"] for (s, bb, gg, mm), r in results.items() if (bb, gg, mm) == (b, g, m)}
            for m in args.methods}
    for m in args.methods:
        t = test[m]
        if not t:
            continue
        seeds = sorted(t)
        vals = [results[(s, b, g, m)]["result"]["validation_ppl"] for s in seeds]
        gq = _ci([test[BASE][s] - t[s] for s in seeds if s in test.get(BASE, {})]) if m != BASE else ("-", None)
        gp = _ci([test[PTQ][s] - t[s] for s in seeds if s in test.get(PTQ, {})]) if m != PTQ else ("-", None)
        rec = [100 * (test[PTQ][s] - t[s]) / (test[PTQ][s] - fl[s]) for s in seeds
               if s in test.get(PTQ, {}) and s in fl and test[PTQ][s] - fl[s] > 1e-9]
        rc = _ci(rec, "{:+.0f}%") if m != PTQ else ("-", None)
        secs = [results[(s, b, g, m)]["time_s"] for s in seeds]
        rho = chosen.get((b, m))
        tl = [results[(s, b, g, m)]["result"].get("train_loss") for s in seeds]
        gap = (f"{statistics.fmean(tl):.3f} / {statistics.fmean(math.log(v) for v in vals):.3f}"
               if all(x is not None for x in tl) else "-")
        lines.append(f"| w{b} g{g} | {m} | {rho if rho is not None else '-'} | {len(seeds)} | {_ms(vals)} | "
                     f"{_ms([t[s] for s in seeds])} | {gq[0]} | {gp[0]} | {rc[0]} | {gap} | "
                     f"{statistics.fmean(secs):.0f} |")
        rows.append(dict(bits=b, group=g, method=m, rho=rho, seeds=seeds, validation_ppl=vals,
                         test_ppl=[t[s] for s in seeds], gain_vs_qat=gq[1], gain_vs_ptq=gp[1], recovered_pct=rc[1],
                         time_s=statistics.fmean(secs)))
    return lines, rows


def report(args: argparse.Namespace, argv: Optional[list[str]], meta: dict[str, Any], floats: dict[int, Any],
           results: dict, chosen: dict, val: dict, t_start: float) -> None:
    """Markdown table and JSON: perplexities, paired gains with 95% intervals, share of PTQ's degradation
    recovered."""
    p = args.preset
    fl = {s: r["result"]["test_ppl"] for s, r in floats.items() if s != SWEEP_SEED}
    fl_val = [r["result"]["validation_ppl"] for s, r in sorted(floats.items()) if s != SWEEP_SEED]
    fsecs = [r["time_s"] for s, r in floats.items() if r["result"].get("trained_steps")]
    nparams = _param_count(p, meta["vocab_actual"])
    head = [
        f"Corpus: Python {meta['python']} stdlib ({meta['root']}), files train/validation/test "
        f"{meta['files']['train']}/{meta['files']['validation']}/{meta['files']['test']}, tokens "
        f"{meta['tokens']['train']}/{meta['tokens']['validation']}/{meta['tokens']['test']}, token stream sha256 "
        f"`{meta['token_sha256'][:16]}`; byte-level BPE vocabulary {meta['vocab_actual']} (train split).",
        f"Model: LlamaForCausalLM {p['model']}, context {p['context']}, untied embeddings, {nparams / 1e6:.2f}M "
        f"parameters; float pretraining {args.pretrain_steps} steps x {p['batch']} windows, AdamW lr "
        f"{p['pretrain_lr']}, warm-up {p['pretrain_warmup']} + cosine; one thread per run.",
        f"Quantized: weight-only, decoder Linears at w bits with a step per group of g inputs (LSQ init), lm_head "
        f"at {p['head_bits']} bits (same groups), embeddings float. Fine-tune {args.finetune_steps} steps, AdamW lr "
        f"{p['finetune_lr']} (warm-up + cosine, no weight decay, clip 1.0), same batches for every method of a seed. "
        f"PTQ (RTN): no training. rho by validation perplexity (seed {SWEEP_SEED}) from {args.rhos}.",
        f"Perplexity over {args.eval_windows} windows of {p['context']} tokens per split; mean +- sd over seeds. "
        "Gains: paired (same seed = same float model and batches) perplexity of the reference minus the method's "
        "(> 0: better), mean [95% t-interval]; recovered = (ppl_PTQ - ppl) / (ppl_PTQ - ppl_float) per seed. "
        "train / val loss: the mean of the last 20 fine-tuning losses (on the batches as trained) and ln(val ppl): "
        "their difference is the generalization gap sharpness-aware training targets."
        + (f" Over-fitting regime: the fine-tune cycles over a fixed pool of {args.finetune_subset} windows "
           f"({args.finetune_steps * p['batch'] / args.finetune_subset:.0f} epochs of it)."
           if args.finetune_subset else ""),
        "", f"Float: validation {_ms(fl_val)}, test {_ms([fl[s] for s in sorted(fl)])} ({len(fl)} seeds, "
        f"{statistics.fmean(fsecs) if fsecs else float('nan'):.0f} s/pretraining). Control, the float model "
        f"fine-tuned like QAT without quantization: validation "
        f"{_ms([r['validation_ppl'] for r in getattr(args, 'control', {}).values()])}, test "
        f"{_ms([r['test_ppl'] for r in getattr(args, 'control', {}).values()])} (if below float, the fine-tune "
        "itself still trains the model: a recovered share over 100% is that, not quantization)", "",
        "| cell | method | rho | seeds | val ppl | test ppl | gain vs QAT | gain vs PTQ | recovered | train / val loss "
        "| s/run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows: list[dict[str, Any]] = []
    for b in args.bits:
        for g in args.groups:
            lines, cell = _cell_rows(args, fl, results, chosen, b, g)
            head += lines
            rows += cell
    sweep = ["", f"rho sweep (validation perplexity, seed {SWEEP_SEED}, group {args.groups[0]}):", "",
             "| bits | method | " + " | ".join(str(r) for r in args.rhos) + " |",
             "|---|---|" + "---:|" * len(args.rhos)]
    for (b, m), v in sorted(val.items()):
        sweep.append(f"| w{b} | {m} | " + " | ".join(f"{v[r]:.3f}" if r in v else "-" for r in args.rhos) + " |")
    probes = getattr(args, "probes", {})
    for b, pr in sorted(probes.items()):
        sweep.append(f"| w{b} | loss rise of the ascent (nats) | "
                     + " | ".join(f"{pr['loss_rise'][str(r)]:+.4f}" for r in args.rhos) + " |")
    if probes:
        sweep += ["", "Gradient norm / norm of one AdamW update at the fine-tune lr (the ascent's first-order loss "
                  "rise is rho x gradient norm): " + ", ".join(
                      f"w{b}: {pr['grad_norm']:.3f} / {pr['adamw_update_norm']:.3f}"
                      for b, pr in sorted(probes.items()))]
    if not val and not probes:  # a fixed rho: no sweep
        sweep = []
    cmd = "python benchmarks/lm_ppl.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = f"Command: `{cmd.strip()}`\n\n" + "\n".join(head + sweep) + "\n"
    out = Path(args.out)
    (out / f"{args.report}.md").write_text(text)
    (out / f"{args.report}.json").write_text(json.dumps(dict(
        command=cmd.strip(), corpus=meta, float=dict(test_ppl=fl, validation_ppl=fl_val),
        float_finetuned=getattr(args, "control", {}), rows=rows,
        chosen_rho={f"w{b}/{m}": r for (b, m), r in chosen.items()},
        sweep={f"w{b}/{m}": {str(r): x for r, x in v.items()} for (b, m), v in val.items()},
        rho_probe={f"w{b}": pr for b, pr in getattr(args, "probes", {}).items()}), indent=1))
    print(text)
    print(f"written {out / f'{args.report}.md'} (.json) in {time.perf_counter() - t_start:.0f}s")


def _param_count(p: dict[str, Any], vocab: int) -> int:
    h, i, n = p["model"]["hidden_size"], p["model"]["intermediate_size"], p["model"]["num_hidden_layers"]
    kv = h * p["model"]["num_key_value_heads"] // p["model"]["num_attention_heads"]
    return 2 * vocab * h + h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)


if __name__ == "__main__":
    sys.exit(main())
