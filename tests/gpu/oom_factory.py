"""A training factory that asks for far more memory than its --mem: the loop's allocator
cap must make it fail with its own CUDA OOM (reason OOM), not its neighbour's."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from worker.training import TrainSpec


class Greedy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hog = torch.empty(8 * 2**30, dtype=torch.uint8, device=x.device)  # 8 GiB, over any test --mem
        return self.linear(x) + hog[:1].float() * 0


def build(args: list[str]) -> TrainSpec:
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
    model = Greedy()
    return TrainSpec(
        model=model, train_loader=DataLoader(data, batch_size=16), optimizer=torch.optim.SGD(model.parameters(), lr=0.1)
    )
