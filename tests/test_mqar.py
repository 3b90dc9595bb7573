"""MQAR: targets only at queries, each target is the value bound to its key, batches deterministic and sliceable."""

import pytest
import torch

from momctl.data import load_dataset
from momctl.errors import MomctlError
from momctl.mqar import FILLER_ID, IGNORE_INDEX, MQARDataset, parse_mqar_spec


@pytest.mark.parametrize("vocab_size,num_pairs,seq_len", [(8192, 16, 64), (256, 8, 100), (20, 9, 36), (7, 2, 8)])
def test_every_query_targets_the_value_bound_to_its_key(vocab_size, num_pairs, seq_len):
    dataset = MQARDataset(vocab_size=vocab_size, num_pairs=num_pairs)
    x, y = dataset.get_batch("train", step=0, seq_len=seq_len, global_batch=32, start=0, count=32, seed=0)
    assert x.shape == y.shape == (32, seq_len) and x.dtype == y.dtype == torch.int64
    half = vocab_size // 2
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        keys, values = row_x[0:2 * num_pairs:2], row_x[1:2 * num_pairs:2]
        assert len(set(keys)) == num_pairs and all(1 <= k < half for k in keys)
        assert all(half <= v < vocab_size for v in values)
        bound = dict(zip(keys, values, strict=True))
        queries = [t for t, target in enumerate(row_y) if target != IGNORE_INDEX]
        assert len(queries) == num_pairs and min(queries) >= 2 * num_pairs  # loss only at queries, after the pairs
        assert sorted(row_x[t] for t in queries) == sorted(keys)  # each key asked exactly once
        assert all(row_y[t] == bound[row_x[t]] for t in queries)
        assert all(row_x[t] == FILLER_ID for t in range(2 * num_pairs, seq_len) if t not in queries)


def test_batches_are_deterministic_sliceable_and_split_apart():
    dataset = MQARDataset(vocab_size=64, num_pairs=4)
    whole = dataset.get_batch("train", 7, 32, 8, 0, 8, seed=1)
    again = dataset.get_batch("train", 7, 32, 8, 0, 8, seed=1)
    halves = [dataset.get_batch("train", 7, 32, 8, start, 4, seed=1) for start in (0, 4)]
    for i in (0, 1):
        assert torch.equal(whole[i], again[i])
        assert torch.equal(torch.cat([half[i] for half in halves]), whole[i])
    assert not torch.equal(whole[0], dataset.get_batch("val", 7, 32, 8, 0, 8, seed=1)[0])
    assert not torch.equal(whole[0], dataset.get_batch("train", 8, 32, 8, 0, 8, seed=1)[0])
    assert not torch.equal(whole[0], dataset.get_batch("train", 7, 32, 8, 0, 8, seed=2)[0])


def test_spec_parsing_and_load_dataset():
    assert parse_mqar_spec("mqar") == {}
    assert parse_mqar_spec("mqar:vocab_size=256, num_pairs=8") == {"vocab_size": 256, "num_pairs": 8}
    dataset = load_dataset("mqar:vocab_size=256,num_pairs=8", None, seq_len=32)
    assert isinstance(dataset, MQARDataset) and dataset.vocab_size == 256 and dataset.num_pairs == 8
    assert dataset.name == "mqar:vocab_size=256,num_pairs=8"
    default = load_dataset("mqar", None, seq_len=64)
    assert (default.vocab_size, default.num_pairs) == (8192, 16)


@pytest.mark.parametrize("spec,seq_len,words", [
    ("mqar:pairs=8", 64, ["'pairs=8'", "vocab_size, num_pairs"]),
    ("mqar:num_pairs=eight", 64, ["num_pairs='eight'", "not an integer"]),
    ("mqar:num_pairs=16", 63, ["needs seq_len >= 64", "got seq_len=63"]),
    ("mqar:vocab_size=16,num_pairs=8", 64, ["vocab_size=16", "use vocab_size >= 18"]),
    ("mqar:num_pairs=0", 64, ["num_pairs=0"]),
])
def test_bad_specs_raise_a_useful_error(spec, seq_len, words):
    with pytest.raises(MomctlError) as info:
        load_dataset(spec, None, seq_len=seq_len)
    for word in words:
        assert word in str(info.value)
