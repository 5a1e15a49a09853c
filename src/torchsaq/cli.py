"""The ``torchsaq`` command line: train, eval, export, summary, landscape, sharpness, allocate.

``torchsaq train``'s flags are generated from :class:`saq.config.TrainConfig`'s fields (``--field-name``;
booleans as ``--x/--no-x``), so they never drift from the config. Only flags given explicitly override
the recipe (``--config recipes/X.yaml``) or, with ``--resume``, the resumed run's stored config.
Errors in the user's input are one line, ``torchsaq: error: ...``, and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "build_parser", "config_from_args", "TRAIN_HELP"]

#: extra help for the generated `torchsaq train` flags (a field without an entry still gets its flag); the
#: lists of names (data sets, models, modes, strategies, ...) are appended from their registries by
#: :func:`train_help`
TRAIN_HELP = {
    "dataset": "data set (torchsaq.data.list_datasets())",
    "data_dir": "folder of the data set (never downloaded; fashion_mnist: its four IDX files, default "
                "/usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist)",
    "model": "model name (torchsaq.list_models())",
    "model_kwargs": "extra model options as a YAML/JSON mapping, e.g. '{drop_path_rate: 0.1}'",
    "pretrained": "float checkpoint (state dict or .safetensors) to start quantization-aware training from",
    "img_size": "image side for image data sets",
    "val_split": "fraction of the training set held out for validation",
    "workers": "data loader worker processes (image data sets; the tensor data sets are batched on the device)",
    "augment": "random training augmentation: CIFAR crop+flip, ImageNet-style resized crop+flip, "
               "fashion_mnist crop 28 (padding 2)+flip; mnist1d and digits have none",
    "w_bits": "weight bits (2..8, 32 = float)",
    "a_bits": "activation bits (2..8, 32 = float; none: weight-only, every input float, first/last layers too)",
    "first_last_bits": "bits of the first and last layer (8, or 32 for float)",
    "embedding_bits": "quantize nn.Embedding tables at these bits, weight-only (2..8); unset: embeddings stay float",
    "quantizer": "weight and activation quantizer",
    "a_mode": "how layer inputs are quantized: static (learned steps) or dynamic_token (int8 per token, computed on "
              "the fly; with --a-bits 8 --group-size G: torchao's 8da4w)",
    "calib_batches": "training batches used to initialise the step sizes",
    "epochs": "training epochs",
    "batch_size": "batch size per process",
    "accum_steps": "gradient accumulation: micro-batches of --batch-size per optimizer step (the effective batch "
                   "is batch_size x accum_steps per process; the LR schedule counts optimizer steps)",
    "optimizer": "base optimizer",
    "lr": "peak learning rate",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum (SGD)",
    "weight_decay": "weight decay (never on step sizes, biases or norm parameters)",
    "lr_schedule": "learning-rate schedule after warm-up (per iteration)",
    "warmup_epochs": "linear learning-rate warm-up, in epochs",
    "step_milestones": "epochs at which lr_schedule=step multiplies the LR by step_gamma",
    "step_gamma": "LR factor at each step milestone",
    "label_smoothing": "label smoothing of the cross-entropy",
    "max_grad_norm": "clip the global gradient norm",
    "sharpness": "sharpness-aware step",
    "rho": "radius of the sharpness-aware perturbation",
    "adaptive": "adaptive (ASAM) perturbation",
    "perturb_unquantized": "also perturb norm affine, biases and float layers (--no-perturb-unquantized: only the "
                           "quantized weights)",
    "perturb_exclude": "parameter-name globs never perturbed (still trained), e.g. --perturb-exclude pos_embed "
                       "cls_token '*norm*'",
    "strategy": "how often the sharpness-aware step runs its ascent pass",
    "strategy_k": "every_k: a full sharpness-aware step every k iterations",
    "strategy_alpha": "every_k: weight of the stored sharp gradient component (default: auto, its measured "
                      "size; 0.7 is LookSAM's published value)",
    "strategy_fraction": "sub_batch: the ascent pass's share of the batch (its first ceil(fraction * B) samples)",
    "rho_warmup_epochs": "warm rho up from 0 over this many epochs",
    "rho_start_epochs": "plain QAT steps (one pass each with --strategy full) for this many epochs, then SAQ's: "
                        "sharpness-aware steps only late in the fine-tune, at 1 + (1 - start/epochs) passes",
    "seed": "random seed (weights, data order, dropout)",
    "output": "output folder (checkpoint.pt, metrics.jsonl/.csv, tb/, curves.png)",
    "device": "auto, cpu, cuda, cuda:N",
    "threads": "CPU threads per process; 0 = auto: 1 for small models (under 0.5 G multiply-accumulates per "
               "batch), else the idle cores (by the load average) shared among the processes on this machine; "
               "at most the machine's cores",
    "freeze_bn": "BatchNorm layers normalise with their running statistics and do not update them while "
                 "training (a common QAT fine-tuning practice); their affine weights still train",
    "compile": "torch.compile the training forward (inductor; the first steps compile, the summary reports "
               "them); evaluation stays eager",
    "lsq_backend": "implementation of the LSQ fake-quantizer",
    "amp": "mixed precision (float16 + GradScaler on CUDA, bfloat16 on CPU)",
    "resume": "continue the run in --output from its checkpoint",
    "overwrite": "start a new run in an --output folder that already holds one, deleting that run's checkpoint, "
                 "metrics, plot and TensorBoard logs first (without it such a folder is refused)",
    "eval_every": "evaluate on the validation/test sets every N epochs (always after the last epoch); the "
                  "epochs between log training metrics only",
    "log_every": "also log the step loss to TensorBoard every N steps",
    "save": "write checkpoint, metrics and plots (--no-save: write nothing)",
    "layer_bits": "per-layer bits by module-name glob, e.g. '{fc: 8, \"layer1.*\": [4, 8]}' (wins over the rest)",
    "exclude": "module-name globs to leave in float, e.g. --exclude head 'blocks.0.*'",
    "train_subset": "train on N examples only: a fixed subset, the same for every seed (0: all)",
    "train_subset_seed": "which fixed subset --train-subset keeps (its own seed, independent of --seed)",
    "limit_train_batches": "at most N training batches per epoch (smoke tests)",
    "limit_eval_batches": "at most N batches per evaluation (smoke tests)",
}


_PATH_FIELDS = {"data_dir", "pretrained", "output"}


def _registries() -> dict[str, Any]:
    """TrainConfig field -> the registry of the names it accepts: the ``choices`` and help of its flag."""
    from .train import config

    return {"sharpness": config.SHARPNESS, "strategy": config.STRATEGIES, "quantizer": config.QUANTIZERS,
            "act_grad_scale": config.ACT_GRAD_SCALES, "a_mode": config.A_MODES, "optimizer": config.OPTIMIZERS,
            "lr_schedule": config.SCHEDULES, "lsq_backend": config.LSQ_BACKENDS}


def _quantizer_option_help() -> dict[str, str]:
    """The help of each quantizer option, from its kind's options dataclass (field metadata): ``"LSQ: ..."``."""
    import dataclasses

    from .quant.quantizer import QUANTIZERS

    out: dict[str, str] = {}
    for kind in QUANTIZERS:
        for f in dataclasses.fields(QUANTIZERS.get(kind).options):
            if "help" in f.metadata:
                out[f.name] = f"{kind.upper()}: {f.metadata['help']}"
    return out


def train_help() -> dict[str, str]:
    """:data:`TRAIN_HELP` with the accepted names appended: every registered data set (with its default model),
    every registered model, and the names of each registry (:func:`_registries`)."""
    from .train.data import dataset_info, list_datasets
    from .train.models import list_models

    out = dict(TRAIN_HELP)
    out["dataset"] += ": " + "; ".join(f"{d} (model {dataset_info(d).default_model}): {dataset_info(d).description}"
                                       for d in list_datasets())
    out["model"] += ": " + ", ".join(list_models()) + "; default: the data set's (see --dataset)"
    out.update(_quantizer_option_help())
    for name, registry in _registries().items():
        out[name] += ": " + registry.describe()
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``torchsaq: error: MESSAGE (see 'torchsaq CMD --help')``, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"torchsaq: error: {message} (see '{self.prog} --help')\n")


def _parse_mapping(text: str) -> dict[str, Any]:
    from ._optional import require

    yaml = require("yaml", "cli", "a mapping option")

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"not a YAML/JSON mapping: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{key: value}}', got {text!r}")
    from .train.config import check_size

    try:
        check_size(value, "the mapping")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _strip_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else str
    return tp


def _field_parser(name: str, item: bool = False) -> Any:
    """argparse ``type=`` for a TrainConfig field: the same parsing as YAML recipes (config.parse_field)."""
    from .train.config import parse_field

    def parse(text: str) -> Any:
        try:
            return parse_field(name, [text])[0] if item else parse_field(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; default SUPPRESS so only explicit flags reach the namespace."""
    from .train.config import TrainConfig

    choices = {name: registry.names() for name, registry in _registries().items()}
    helps = train_help()
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training options (TrainConfig fields; default in brackets)")
    for f in dataclasses.fields(TrainConfig):
        tp = _strip_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_ = f"{helps.get(f.name, f.name.replace('_', ' '))} [{default}]"
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
        origin = typing.get_origin(tp)
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif origin is list:
            (item,) = typing.get_args(tp) or (str,)
            group.add_argument(flag, nargs="*", type=_field_parser(f.name, item=True), metavar=item.__name__.upper(),
                               **kw)
        elif origin is dict or tp is dict:
            group.add_argument(flag, type=_parse_mapping, metavar="MAPPING", **kw)
        elif f.name in choices:
            group.add_argument(flag, choices=choices[f.name], **kw)
        else:
            metavar = "PATH" if f.name in _PATH_FIELDS else {int: "INT", float: "FLOAT"}.get(tp, "NAME")
            group.add_argument(flag, type=_field_parser(f.name), metavar=metavar, **kw)


def _where(text: str) -> str:
    """``--where``: a name of :data:`torchsaq.optim.perturb.WHERE`; "float" (the flag's earlier spelling) means
    latent."""
    return "latent" if text == "float" else text


def build_parser() -> argparse.ArgumentParser:
    """The ``torchsaq`` argument parser with its sub-commands."""
    from . import __version__
    from .optim.functional import DEFAULT_RHO
    from .optim.perturb import WHERE

    p = _Parser(prog="torchsaq", description="Sharpness-Aware Quantization: quantization-aware training with SAQ.")
    p.add_argument("--version", action="version", version=f"torchsaq {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a quantized model (default: MNIST-1D, 1-D CNN, w4a4, SAQ)",
                       description="Train a quantized model. With no options: the embedded MNIST-1D data set, "
                                   "a 1-D CNN, 4-bit weights and activations, SAQ (case 3). Run under "
                                   "`torchrun --nproc_per_node N -m torchsaq train ...` for DistributedDataParallel.")
    t.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe (keys = option names); flags override it")
    _add_config_flags(t)

    def checkpoint_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("checkpoint", help="a checkpoint.pt written by torchsaq train (or its output folder)")

    e = sub.add_parser("eval", help="top-1/top-5 accuracy and loss of a checkpoint, or of an exported .onnx file "
                                    "in onnxruntime, on its test set")
    e.add_argument("checkpoint", help="a checkpoint.pt written by torchsaq train (or its output folder), or a .onnx "
                                      "file written by torchsaq export (run in onnxruntime's default session and "
                                      "scored next to the PyTorch model of the run it came from)")
    e.add_argument("--run", help="with a .onnx file: the run (folder or checkpoint.pt) to compare with and take the "
                                 "data set from (default: the one recorded in the file by torchsaq export)")
    e.add_argument("--dataset", help="with a .onnx file: the data set to score it on (default: the run's)")
    e.add_argument("--split", choices=("test", "val"), default="test",
                   help="the test set, or the validation split held out of the training set (val_split > 0)")
    e.add_argument("--data-dir", help="data folder, if it moved since training")
    e.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument("--json", action="store_true", help="print the result as JSON")

    x = sub.add_parser("export", help="export a checkpoint as integer weights + scales (safetensors, or ONNX)")
    checkpoint_arg(x)
    x.add_argument("out", help="output file: .safetensors, or .onnx for a graph that onnxruntime runs (needs pip "
                               "install 'torchsaq[onnx]')")
    x.add_argument("--onnx-mode", choices=("compact", "fast"), default=None,
                   help="for .onnx: compact (default; 4-bit weights, float kernels: the smallest file) or fast "
                        "(8-bit containers, onnxruntime's integer kernels ConvInteger/MatMulInteger; same outputs)")

    s = sub.add_parser("summary", help="per-layer table, model size and BOPs of a checkpoint")
    checkpoint_arg(s)

    ls = sub.add_parser("landscape", help="1-D/2-D loss landscape plots of one or more checkpoints")
    ls.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                    help="checkpoint.pt files (or run folders) of one data set, plotted together")
    ls.add_argument("--dims", type=int, choices=(1, 2), default=1, help="1-D curves or a 2-D surface")
    ls.add_argument("--steps", type=int, default=21, help="grid points per direction")
    ls.add_argument("--span", type=float, default=1.0, help="grid covers [-span, span] (filter-normalised)")
    ls.add_argument("--num-samples", type=int, default=512, help="training samples the loss is measured on")
    ls.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    ls.add_argument("--where", type=_where, choices=WHERE.names(), default="quantized",
                    help=f"which weights to perturb: {WHERE.describe()} ('float' is read as latent)")
    ls.add_argument("--seed", type=int, default=0, help="seed of the random directions and the sample subset")
    ls.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N")
    ls.add_argument("--output", default="runs/landscape",
                    help="output folder (replaces only the plot and data files an earlier landscape wrote there)")

    sh = sub.add_parser("sharpness", help="Hessian top eigenvalue/trace and SAM sharpness of a checkpoint")
    checkpoint_arg(sh)
    sh.add_argument("--rho", type=float, default=DEFAULT_RHO,
                    help="radius of the SAM sharpness (worst loss within rho)")
    sh.add_argument("--m", type=int, default=None, help="m-sharpness: batch size of the adversarial step")
    sh.add_argument("--iters", type=int, default=20, help="power iterations for the top eigenvalue")
    sh.add_argument("--num-samples", type=int, default=512, help="training samples the measures use")
    sh.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    sh.add_argument("--seed", type=int, default=0, help="seed of the sample subset and the random vectors")
    sh.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N")
    sh.add_argument("--output", default=None,
                    help="also write the result as JSON to this file (replaces only an earlier sharpness result)")
    _add_allocate(sub)
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, sp in sub.choices.items():
        if name != "train":  # train's flags say their defaults already (generated from TrainConfig)
            _document(sp, summaries.get(name))
    return p


def _document(sp: argparse.ArgumentParser, summary: Optional[str]) -> None:
    """A sub-command's help as ``train --help``'s: a description, and every option's default in brackets."""
    if sp.description is None and summary:
        sp.description = summary[0].upper() + summary[1:] + "."
    for a in sp._actions:
        if a.option_strings and a.help and a.help is not argparse.SUPPRESS and not a.help.endswith("]") \
                and a.default is not None and a.default is not False and a.default is not argparse.SUPPRESS:
            a.help = f"{a.help} [{a.default}]"


def _add_allocate(sub: Any) -> None:
    """``torchsaq allocate``: per-layer bits from sharpness under one budget (torchsaq.allocate)."""
    from .analysis.allocate import ACTIVATIONS, MEASURES

    al = sub.add_parser("allocate", help="mixed precision: per-layer weight bits under a size/BOPs budget, where "
                                         "the loss is sharp (mean Hessian trace x quantization noise, solved exactly)")
    al.add_argument("checkpoint", help="a checkpoint.pt written by torchsaq train (or its output folder)")
    budget = al.add_mutually_exclusive_group(required=True)
    budget.add_argument("--avg-bits", type=float, help="mean weight bits of the allocated layers (weighted by size)")
    budget.add_argument("--size-mib", type=float, help="model size in MiB, as `torchsaq summary` counts it")
    budget.add_argument("--bops", type=float, help="GBOPs per sample, as `torchsaq summary` counts them")
    al.add_argument("--choices", type=int, nargs="+", default=[2, 3, 4, 8], help="bit-widths a layer may get")
    al.add_argument("--activations", choices=ACTIVATIONS, default="keep",
                    help="keep: each layer keeps its activation bits; same: activations get the weight bits")
    al.add_argument("--measure", choices=MEASURES, default="trace",
                    help="layer sensitivity: trace (mean Hessian trace) or none (1: the quantization noise alone)")
    al.add_argument("--first-last", action="store_true",
                    help="also allocate the first and last layers (by default they keep first_last_bits)")
    al.add_argument("--samples", type=int, default=32, help="Hutchinson vectors of the Hessian trace")
    al.add_argument("--num-samples", type=int, default=512, help="training samples the Hessian is measured on")
    al.add_argument("--batch-size", type=int, default=256, help="batch size of the Hessian-vector products")
    al.add_argument("--seed", type=int, default=0, help="seed of the samples and the Hutchinson vectors")
    al.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    al.add_argument("--output", default="allocation.yaml",
                    help="recipe fragment for `torchsaq train --config` (replaces only a file written by allocate)")


def config_from_args(args: argparse.Namespace):
    """TrainConfig from the recipe (or the resumed run's stored config), then the explicitly given flags."""
    from .train.config import TrainConfig, load_recipe

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if args.config:
        return load_recipe(args.config, **overrides)
    if overrides.get("resume"):
        from .train.checkpoint import load_checkpoint
        from .train.runner import CHECKPOINT_NAME

        ckpt = Path(overrides.get("output", TrainConfig.output)) / CHECKPOINT_NAME
        if not ckpt.is_file():
            raise ValueError(f"nothing to resume: {ckpt} does not exist")
        stored = dict(load_checkpoint(ckpt)["config"])
        stored["overwrite"] = False  # how that run was started, not how to continue it
        stored.update(overrides)
        return TrainConfig.from_dict(stored)
    return TrainConfig(**overrides)


def _device(name: str) -> str:
    from .train.runner import resolve_device

    return str(resolve_device(name))


def check_train_requirements(cfg: Any) -> None:
    """An ImportError naming the missing distributions and the extra to install, before a run starts.

    ``torchsaq train`` needs the ``cli`` extra (progress bar; with ``save``: the YAML config, the output
    folder lock and the loss plot), the data set's own requirements and, for a torchvision or timm model,
    that package -- checked here so that a run does not fail at its end, after the training.
    """
    from ._optional import install_hint, missing
    from .train.data import dataset_info
    from .train.models import model_info

    needs: dict[str, list[str]] = {"cli": ["tqdm"]}
    if cfg.save:
        needs["cli"] += ["yaml", "filelock", "matplotlib"]
    info = dataset_info(cfg.dataset)
    needs.setdefault(info.extra, []).extend(info.requires)
    source = model_info(cfg.model).source
    if source in ("torchvision", "timm"):
        needs.setdefault("vision" if source == "torchvision" else "timm", []).append(source)
    lacking = {extra: missing(modules) for extra, modules in needs.items()}
    lacking = {extra: dists for extra, dists in lacking.items() if dists}
    if lacking:
        dists = sorted({d for ds in lacking.values() for d in ds})
        raise ImportError(f"torchsaq train ({cfg.dataset}, {cfg.model}) needs {', '.join(dists)}, not installed: "
                          + " and ".join(install_hint(extra) for extra in lacking))


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.runner import TrainingInterrupted, format_result, train

    cfg = config_from_args(args)
    check_train_requirements(cfg)
    try:
        result = train(cfg, progress=True)
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
            return 130
        if e.checkpoint:
            print(f"torchsaq: {e}; continue with: torchsaq train --resume --output {cfg.output}", file=sys.stderr)
        else:
            print(f"torchsaq: {e}", file=sys.stderr)
        return 130
    if result.get("rank", 0) == 0:
        print(format_result(result))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from .train.checkpoint import load_model
    from .train.data import build_datasets
    from .train.runner import evaluate

    if args.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {args.batch_size}")
    if str(args.checkpoint).lower().endswith(".onnx"):
        return _eval_onnx(args)
    if args.run or args.dataset:
        raise ValueError("--run and --dataset apply to a .onnx file; a checkpoint is scored on its own data set")
    device = _device(args.device)
    model, cfg, info = load_model(args.checkpoint, device)
    if args.data_dir:
        from .train.data import check_data_dir_read

        check_data_dir_read(cfg.dataset, args.data_dir)
    bundle = build_datasets(cfg.dataset, data_dir=args.data_dir or cfg.data_dir, img_size=cfg.img_size,
                            val_split=cfg.val_split, seed=cfg.seed)
    ds = bundle.test if args.split == "test" else bundle.val
    if ds is None:
        raise ValueError("this run has no validation split (it was trained with val_split=0)")
    m = evaluate(model, DataLoader(ds, batch_size=args.batch_size, shuffle=False), device)
    m = {"checkpoint": info["path"], "split": args.split, "top1": m["acc"], "top5": m["top5"],
         "loss": m["loss"], "samples": m["n"]}
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{info['path']}: {cfg.model} on {cfg.dataset} {args.split} ({m['samples']} samples): "
              f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}")
    return 0


def _eval_onnx(args: argparse.Namespace) -> int:
    """``torchsaq eval model.onnx``: the file in onnxruntime's default session, and the run's PyTorch model."""
    from torch.utils.data import DataLoader

    from .train.checkpoint import load_model
    from .train.config import TrainConfig
    from .train.data import build_datasets
    from .export.onnx import OnnxModel, onnx_metadata
    from .train.runner import evaluate

    if not Path(args.checkpoint).is_file():
        raise ValueError(f"ONNX file not found: {args.checkpoint}")
    meta = onnx_metadata(args.checkpoint)
    run = args.run or (meta.get("saq_checkpoint") if Path(meta.get("saq_checkpoint", "")).exists() else None)
    model, cfg = (load_model(run)[:2]) if run else (None, TrainConfig())
    dataset = args.dataset or (cfg.dataset if run else meta.get("saq_dataset"))
    if not dataset:
        raise ValueError(f"{args.checkpoint} does not record its run or data set: give --dataset NAME or --run RUN")
    onnx_model = OnnxModel(args.checkpoint)
    shape = onnx_model.session.get_inputs()[0].shape
    img_size = cfg.img_size if run else (shape[-1] if len(shape) == 4 and isinstance(shape[-1], int) else None)
    bundle = build_datasets(dataset, data_dir=args.data_dir or cfg.data_dir, img_size=img_size,
                            val_split=cfg.val_split, seed=cfg.seed)
    ds = bundle.test if args.split == "test" else bundle.val
    if ds is None:
        raise ValueError("this run has no validation split (it was trained with val_split=0)")
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False)
    rows = {"onnx": evaluate(onnx_model, loader)}
    if model is not None:
        rows["pytorch"] = evaluate(model, loader)
    result = {"file": str(args.checkpoint), "run": str(run) if run else None, "dataset": dataset, "split": args.split,
              "onnxruntime": onnx_model.version, "onnx_mode": meta.get("saq_onnx_mode"),
              **{f"{k}_{m}": v[m_key] for k, v in rows.items() for m, m_key in
                 (("top1", "acc"), ("top5", "top5"), ("loss", "loss"), ("samples", "n"))}}
    if args.json:
        print(json.dumps(result))
        return 0
    for k, v in rows.items():
        what = (f"{args.checkpoint} ({meta.get('saq_onnx_mode')}) in onnxruntime {onnx_model.version}, default "
                "session" if k == "onnx" else f"PyTorch model of {run}")
        print(f"{what}: {dataset} {args.split} ({v['n']} samples): top-1 {v['acc']:.2f}%  top-5 {v['top5']:.2f}%  "
              f"loss {v['loss']:.4f}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .train.checkpoint import load_model
    from .export import export
    from .train.runner import CHECKPOINT_NAME

    source = Path(args.checkpoint)
    source = source / CHECKPOINT_NAME if source.is_dir() else source
    if Path(args.out).exists() and source.exists() and os.path.samefile(source, args.out):
        raise ValueError(f"the export would overwrite its source checkpoint {source}; give another output file")
    onnx = str(args.out).lower().endswith(".onnx")
    if not onnx and not str(args.out).lower().endswith(".safetensors") and not Path(args.out).is_dir():
        raise ValueError(f"export: {args.out}: give a .safetensors or .onnx file name (the suffix says which format "
                         "is written; anything else could be taken for a checkpoint)")
    if args.onnx_mode and not onnx:
        raise ValueError(f"--onnx-mode applies to .onnx files, not {args.out}")
    model, cfg, info = load_model(args.checkpoint)
    import torch

    # the run and data set go into the ONNX file's metadata, for `torchsaq eval model.onnx`
    options: dict[str, Any] = {"onnx_mode": args.onnx_mode or "compact",
               "metadata": {"saq_checkpoint": str(source.resolve()), "saq_dataset": str(info["dataset"]),
                            "saq_model": cfg.model}} if onnx else {}
    # ONNX traces one batch of the training input shape (batch dimension symbolic); safetensors ignores it
    print(export(model, args.out, example_inputs=(torch.zeros(1, *info["input_shape"]),), **options))
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from .train.checkpoint import load_model
    from .quant.summary import summary
    from .train.config import bits_label

    model, cfg, info = load_model(args.checkpoint)
    print(f"{info['path']}: {cfg.model} on {cfg.dataset}, {bits_label(cfg.w_bits, cfg.a_bits)} "
          f"(first/last {cfg.first_last_bits}), input {tuple(info['input_shape'])}, epoch {info['epoch']}")
    print(summary(model))
    return 0


def _cmd_landscape(args: argparse.Namespace) -> int:
    from .analysis import run_landscape

    paths = run_landscape(args.checkpoints, args.output, dims=args.dims, steps=args.steps, span=args.span,
                          num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                          where=args.where, device=_device(args.device))
    for key, path in paths.items():
        print(f"{key:<24} {path}")
    return 0


def _is_sharpness_json(path: Path) -> bool:
    """Whether ``path`` holds what ``torchsaq sharpness --output`` writes (the only file it may replace)."""
    try:
        row = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(row, dict) and {"checkpoint", "hessian_top_eigenvalue", "sam_sharpness"} <= set(row)


def _cmd_sharpness(args: argparse.Namespace) -> int:
    from .analysis import format_sharpness_table, run_sharpness

    if args.output and Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a folder; give a file name such as sharpness.json")
    if args.output and Path(args.output).exists() and not _is_sharpness_json(Path(args.output)):
        raise ValueError(f"--output {args.output} exists and is not a torchsaq sharpness result (a checkpoint?); "
                         "refusing to replace it: give another file name")
    row = run_sharpness(args.checkpoint, num_samples=args.num_samples, batch_size=args.batch_size, rho=args.rho,
                        m=args.m, iters=args.iters, seed=args.seed, device=_device(args.device))
    print(format_sharpness_table([row]), end="")
    if args.output:
        from ._io import atomic_write_text

        atomic_write_text(args.output, json.dumps(row, indent=1) + "\n")
    return 0


def _cmd_allocate(args: argparse.Namespace) -> int:
    from .analysis.allocate import run_allocate

    budget = ({"avg_bits": args.avg_bits} if args.avg_bits is not None else
              {"size_bytes": args.size_mib * 2**20} if args.size_mib is not None else {"bops": args.bops * 1e9})
    result, path = run_allocate(args.checkpoint, args.output, budget, args.choices, activations=args.activations,
                                measure=args.measure, first_last=args.first_last, samples=args.samples,
                                num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                                device=_device(args.device))
    print(result)
    print(f"written {path}: torchsaq train --config {path}")
    return 0


_COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "export": _cmd_export, "summary": _cmd_summary,
             "landscape": _cmd_landscape, "sharpness": _cmd_sharpness, "allocate": _cmd_allocate}


def _one_line(e: BaseException) -> str:
    text = str(e)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its last line is the error
        text = text.strip().splitlines()[-1]
    return " ".join(text.split()) or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``torchsaq`` command; returns the exit status (also for ``python -m torchsaq``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .quant.quantizer import NotInitializedError

    try:
        return _COMMANDS[args.command](args)
    # OSError: disk, permissions, images; ImportError: an optional extra (onnx) that is not installed
    except (ValueError, OSError, NotInitializedError, FloatingPointError, ImportError) as e:
        print(f"torchsaq: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("torchsaq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
