"""Images/sec of SGD vs K-FAC variants side by side, in the spirit of Horovod's
pytorch_synthetic_benchmark.py (random data, so only speed is measured).

    horovodrun -np 2 -H localhost:2 --gloo python examples/pytorch_synthetic_benchmark.py --out results/bench/np2.json
    python examples/pytorch_synthetic_benchmark.py --model resnet50 --cuda --batch-size 32   # one GPU

Variants: SGD (hvd.DistributedOptimizer) and, per strategy, K-FAC with every-step updates, fixed
intervals (factors every 10 steps, inverses every 100) and the adaptive stale-statistics rule.
Reported per variant: images/sec, time per step relative to SGD, modelled bytes sent per rank per
step (ring algorithms) relative to SGD's gradient allreduce, and the fraction of statistic
computations skipped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List

import horovod.torch as hvd
import torch
from torch import nn

import hvd_ngd.torch as ngd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VARIANTS, benchmark_parser, benchmark_row, report  # noqa: E402


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck block."""

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
            nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
            nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))


def resnet(blocks: List[int], width: int = 64, classes: int = 1000, small_input: bool = False) -> nn.Module:
    """A torchvision-free ResNet with bottlenecks ([3, 4, 6, 3] = ResNet-50)."""
    stem = (
        [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        if small_input
        else [nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    )
    layers: List[nn.Module] = list(stem)
    cin = width
    for stage, count in enumerate(blocks):
        planes = width * 2**stage
        for b in range(count):
            layers.append(Bottleneck(cin, planes, stride=2 if b == 0 and stage > 0 else 1))
            cin = planes * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def build(name: str) -> tuple:
    """Model and input shape."""
    if name == "resnet50":
        return resnet([3, 4, 6, 3]), (3, 224, 224), 1000
    return resnet([1, 1], width=16, classes=10, small_input=True), (3, 32, 32), 10




def bench_one(model_name: str, variant: str, strategy: str, args, device) -> Dict:
    torch.manual_seed(0)
    model, shape, classes = build(model_name)
    model = model.to(device)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if variant == "sgd":
        opt = hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters())
    else:
        opt = ngd.DistributedOptimizer(sgd, model, strategy=strategy, damping=1e-3, lr=0.01,
                                       assignment_cost=args.assignment_cost if strategy == "spngd" else "compute",
                                       **VARIANTS[variant])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    x = torch.randn(args.batch_size, *shape, device=device)
    y = torch.randint(0, classes, (args.batch_size,), device=device)

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    bytes_before = opt.kfac.comm.bytes_sent if variant != "sgd" else 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n = hvd.size()
    if variant == "sgd":
        sent = 2.0 * (n - 1) / n * param_bytes
        skipped = 0.0
    else:
        sent = (opt.kfac.comm.bytes_sent - bytes_before) / args.iters
        if strategy != "spngd":  # KAISA: hvd.DistributedOptimizer allreduces the gradients
            sent += 2.0 * (n - 1) / n * param_bytes
        skipped = opt.kfac.engine.tracker.counts.skipped_fraction
    return benchmark_row(variant, strategy if variant != "sgd" else "-", elapsed, args.iters, args.batch_size * n,
                         sent, skipped)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    device = torch.device("cuda", hvd.local_rank()) if args.cuda else torch.device("cpu")
    rows = [bench_one(args.model, "sgd", "-", args, device)]
    for strategy in args.strategies.split(","):
        for variant in args.variants.split(","):
            rows.append(bench_one(args.model, variant, strategy, args, device))
    if hvd.rank() == 0:
        report(rows, args, "pytorch", hvd.size(), torch.cuda.get_device_name(device) if args.cuda else "CPU")


if __name__ == "__main__":
    main()
