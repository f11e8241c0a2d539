"""A training factory big enough for the pre-run estimate's error to mean something on a GPU:
an MLP of WIDTH hidden units over BATCH samples of 1024 features, trained with Adam.

    python -m worker.training tests/gpu/estimate_factory.py -- --width 4096 --batch 512
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from worker.training import TrainSpec


def build(args: list[str]) -> TrainSpec:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=512)
    ns = p.parse_args(args)
    data = TensorDataset(torch.randn(ns.batch * 2, 1024), torch.randint(0, 10, (ns.batch * 2,)))
    model = nn.Sequential(
        nn.Linear(1024, ns.width), nn.GELU(), nn.Linear(ns.width, ns.width), nn.GELU(), nn.Linear(ns.width, 10)
    )
    return TrainSpec(
        model=model,
        train_loader=DataLoader(data, batch_size=ns.batch),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
    )
