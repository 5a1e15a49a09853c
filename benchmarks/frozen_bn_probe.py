"""Plain PyTorch, no torchsaq in the loop: does fine-tuning a BatchNorm-trained float model with frozen BatchNorm
statistics diverge at the fine-tune's learning rate? (the reference for fashion.py's frozen-BatchNorm diagnosis)

    python benchmarks/frozen_bn_probe.py benchmarks/results/fashion_float_cpu_gap/seed0/checkpoint.pt
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from torchsaq.train.checkpoint import load_checkpoint
from torchsaq.train.data import build_datasets
from torchsaq.train.models import create_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a cnn_fmnist float checkpoint (fashion.py --preset cpu_gap --stage float)")
    p.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.001])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--subset", type=int, default=2000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    state = load_checkpoint(args.checkpoint)
    width = state["config"].get("model_kwargs", {}).get("width", 16)
    ds = build_datasets("fashion_mnist", augment=False, val_split=0.1).train
    xs = torch.stack([ds[i][0] for i in range(args.subset)])
    ys = torch.tensor([int(ds[i][1]) for i in range(args.subset)])
    print("lr | BatchNorm | loss at steps 1-6 | last 3")
    for lr in args.lrs:
        for frozen in (True, False):
            torch.manual_seed(0)
            model = create_model("cnn_fmnist", 10, width=width)
            model.load_state_dict(state["model"], strict=False)  # the float weights (quantizer entries ignored)
            model.train()
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and frozen:
                    m.eval()
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            losses = []
            for _ in range(args.steps):
                idx = torch.randint(0, args.subset, (128,))
                loss = F.cross_entropy(model(xs[idx]), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            print(f"{lr} | {'frozen' if frozen else 'batch stats'} | "
                  f"{' '.join(f'{v:.3g}' for v in losses[:6])} | {' '.join(f'{v:.3g}' for v in losses[-3:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
