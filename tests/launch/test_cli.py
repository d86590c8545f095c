"""What the job CLIs print for an error: its own message, also when it was raised in a DataLoader worker."""

from __future__ import annotations

import pytest
import torch

from launch.cli import message
from pipeline.storage import StorageUnavailable

WHY = "reading s3://bucket/shards/train-000002.tar (rank 0): storage unreachable for 4 s: ConnectionClosedError"


class _Failing(torch.utils.data.IterableDataset):
    def __iter__(self):
        try:
            raise ConnectionResetError("cut")
        except ConnectionResetError as cause:  # chained, as the reader's errors are
            raise StorageUnavailable(WHY) from cause


def test_an_error_from_a_dataloader_worker_is_printed_as_its_own_message():
    with pytest.raises(StorageUnavailable) as caught:
        next(iter(torch.utils.data.DataLoader(_Failing(), batch_size=None, num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # what torch makes of it in the main process
    assert message(caught.value) == f"{WHY} (in DataLoader worker process 0)"


class _Builtin(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise KeyError("s2.npy")  # `traceback` names built-in types without their module


def test_a_builtin_error_from_a_worker_is_unwrapped_too():
    with pytest.raises(KeyError) as caught:
        next(iter(torch.utils.data.DataLoader(_Builtin(), batch_size=None, num_workers=1)))
    assert message(caught.value) == "'s2.npy' (in DataLoader worker process 0)"


def test_other_errors_are_printed_as_they_are():
    assert message(StorageUnavailable(WHY)) == WHY
    # torch's first line, but no line naming the error after it: left whole
    lookalike = StorageUnavailable("Caught StorageUnavailable in DataLoader worker process 0.\nOriginal Traceback "
                                   "(most recent call last): cut short")
    assert message(lookalike) == str(lookalike)
