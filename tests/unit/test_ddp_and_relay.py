"""Pure pieces of `gpulab train --gpus N` (the DDP shard of an epoch, the torchrun argv) and of
`gpulab run` (the relay's frames)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpulab.pty_relay import DATA, EXIT, MAX_FRAME, FrameReader, frame
from jobs.training_command import training_argv
from worker.training.distributed import ShardBatchSampler


@given(n=st.integers(0, 60), world=st.integers(1, 8))
def test_shards_are_equal_disjoint_and_cover_all_but_the_uneven_tail(n: int, world: int) -> None:
    batches = [[i] for i in range(n)]
    shards = [list(ShardBatchSampler(batches, rank, world)) for rank in range(world)]
    assert {len(s) for s in shards} == {n // world}  # every rank runs the same number of steps
    assert all(len(ShardBatchSampler(batches, r, world)) == n // world for r in range(world))
    taken = sorted(b[0] for s in shards for b in s)
    assert taken == list(range((n // world) * world))


def test_the_shard_exposes_the_shuffling_sampler_for_per_epoch_seeding() -> None:
    class Inner(list):  # type: ignore[type-arg]
        sampler = "the sampler"

    assert ShardBatchSampler(Inner([[0], [1]]), 0, 2).sampler == "the sampler"


def test_more_than_one_gpu_trains_under_torchrun() -> None:
    one = training_argv("py", "/f.py", ["--epochs", "2"], ["--lr", "1"], gpus=1)
    assert one == ("py", "-P", "-m", "worker.training", "/f.py", "--epochs", "2", "--", "--lr", "1")
    two = training_argv("py", "/f.py", ["--epochs", "2"], ["--lr", "1"], gpus=2)
    assert two[:6] == ("py", "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    assert two[6] == "--no-python" and two[7:] == one


@given(payloads=st.lists(st.binary(max_size=300), max_size=8), cut=st.integers(1, 50))
def test_frames_survive_any_split_of_the_stream(payloads: list[bytes], cut: int) -> None:
    stream = b"".join(frame(DATA, p) for p in payloads) + frame(EXIT, struct.pack("!i", 7))
    reader, got = FrameReader(), []
    for i in range(0, len(stream), cut):
        got += reader.feed(stream[i : i + cut])
    assert got == [(DATA, p) for p in payloads] + [(EXIT, struct.pack("!i", 7))]


def test_an_absurd_frame_length_is_refused_not_buffered() -> None:
    with pytest.raises(ValueError, match="frame of"):
        FrameReader().feed(struct.pack("!cI", DATA, MAX_FRAME + 1))
