"""Multi-query associative recall (MQAR, after Zoology): can the model's memory recall values bound to keys?

One sequence of length T with P = num_pairs and V = vocab_size:

    positions 0 .. 2P-1     k_1 v_1 k_2 v_2 ... k_P v_P      the key-value pairs
    positions 2P .. T-1     filler id 0, except at P query positions, where every key appears once more

Keys are drawn without replacement from ids 1 .. V//2 - 1 (distinct within a sequence), values with replacement from
V//2 .. V-1, so keys, values and the filler never share an id. The P query positions are distinct and uniform over
2P .. T-1 (Zoology places them by a power law, favouring short gaps; uniform is harder at long range and simpler);
which key each query asks for is a random permutation. Targets: at the query position of key k_i the target is v_i;
every other target is IGNORE_INDEX (-100), so the loss counts queries only.
"""

from __future__ import annotations

import torch

from .data import batch_generator, check_batch_args
from .errors import MomctlError

IGNORE_INDEX = -100
FILLER_ID = 0
_OPTIONS = ("vocab_size", "num_pairs")


def parse_mqar_spec(spec: str) -> dict[str, int]:
    """`"mqar"` -> {}; `"mqar:vocab_size=256,num_pairs=8"` -> {"vocab_size": 256, "num_pairs": 8}."""
    head, _, tail = spec.partition(":")
    if head != "mqar":
        raise MomctlError(f"{spec!r} is not an mqar spec; expected mqar or mqar:vocab_size=N,num_pairs=N")
    options: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in tail.split(","))):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or key not in _OPTIONS:
            raise MomctlError(f"mqar option {item!r} is not understood; expected key=value with key one of "
                              f"{', '.join(_OPTIONS)}, e.g. mqar:vocab_size=256,num_pairs=8")
        try:
            options[key] = int(value)
        except ValueError:
            raise MomctlError(f"mqar option {key}={value!r} is not an integer; e.g. mqar:{key}=8") from None
    return options


class MQARDataset:
    """Synthetic MQAR batches, generated on the fly; no tokenizer (`vocab_size` is the model's vocabulary).

    Args:
        vocab_size: ids in use, 0 .. vocab_size-1 (default 8192); needs vocab_size // 2 - 1 >= num_pairs.
        num_pairs: key-value pairs per sequence (default 16); needs 4 * num_pairs <= seq_len.
    """

    def __init__(self, vocab_size: int = 8192, num_pairs: int = 16):
        if num_pairs < 1:
            raise MomctlError(f"mqar num_pairs={num_pairs}; expected at least 1")
        if vocab_size // 2 - 1 < num_pairs:
            raise MomctlError(f"mqar vocab_size={vocab_size} has only {max(vocab_size // 2 - 1, 0)} key ids for "
                              f"num_pairs={num_pairs} distinct keys; use vocab_size >= {2 * num_pairs + 2}")
        self.vocab_size = vocab_size
        self.num_pairs = num_pairs
        self.name = f"mqar:vocab_size={vocab_size},num_pairs={num_pairs}"

    @classmethod
    def from_spec(cls, spec: str) -> MQARDataset:
        """Build from `mqar[:vocab_size=N,num_pairs=N]`."""
        return cls(**parse_mqar_spec(spec))

    def __repr__(self) -> str:
        return f"MQARDataset(vocab_size={self.vocab_size}, num_pairs={self.num_pairs})"

    def check_seq_len(self, seq_len: int) -> None:
        """MomctlError unless 4 * num_pairs <= seq_len (the pairs take 2P, the queries need room after them)."""
        if 4 * self.num_pairs > seq_len:
            raise MomctlError(f"mqar num_pairs={self.num_pairs} needs seq_len >= {4 * self.num_pairs} (4 * num_pairs), "
                              f"got seq_len={seq_len}; use a longer --seq-len or fewer pairs")

    def get_batch(self, split: str, step: int, seq_len: int, global_batch: int, start: int, count: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences `start .. start+count-1` of the `global_batch` sequences of batch number `step`.

        The whole global batch is drawn from `batch_generator(seed, split, step)` and then sliced, so ranks taking
        slices equal one process taking all; "val" draws from a different stream than "train".

        Returns:
            x: int64 `[count, seq_len]` token ids.
            y: int64 `[count, seq_len]`, the value at query positions and IGNORE_INDEX elsewhere.
        """
        check_batch_args(split, step, seq_len, global_batch, start, count)
        self.check_seq_len(seq_len)
        generator = batch_generator(seed, f"mqar-{split}", step)
        pairs, half = self.num_pairs, self.vocab_size // 2
        # float64 scores make ties (whose order could differ between CPUs) practically impossible.
        keys = _top_indices(torch.rand(global_batch, half - 1, generator=generator, dtype=torch.float64), pairs) + 1
        values = torch.randint(half, self.vocab_size, (global_batch, pairs), generator=generator)  # [G, P]
        asked = torch.rand(global_batch, pairs, generator=generator, dtype=torch.float64).argsort(dim=1)  # [G, P]
        gaps = torch.rand(global_batch, seq_len - 2 * pairs, generator=generator, dtype=torch.float64)
        positions = _top_indices(gaps, pairs).sort(dim=1).values + 2 * pairs  # [G, P]

        x = torch.full((global_batch, seq_len), FILLER_ID, dtype=torch.int64)
        x[:, 0:2 * pairs:2] = keys
        x[:, 1:2 * pairs:2] = values
        x.scatter_(1, positions, keys.gather(1, asked))
        y = torch.full((global_batch, seq_len), IGNORE_INDEX, dtype=torch.int64)
        y.scatter_(1, positions, values.gather(1, asked))
        return x[start:start + count].contiguous(), y[start:start + count].contiguous()


def _top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k largest scores of each row: k distinct columns drawn uniformly. `[G, n]` -> `[G, k]`."""
    return scores.topk(k, dim=1).indices
