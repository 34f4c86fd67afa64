"""Self-attention keys and values of every decoder block, for the rows of a batch still decoding.

One preallocated buffer per kind, (blocks, rows, heads, positions, head_dim), and per block and
row the number of positions filled. Rows may stand at different positions (FREE's rollback moves
one row back while the others go on), so every write names its (row, position) pairs.
"""

from typing import List

import torch


class KVCache:
    def __init__(self, num_blocks: int, rows: int, num_heads: int, capacity: int, head_dim: int,
                 device, dtype):
        shape = (num_blocks, rows, num_heads, capacity, head_dim)
        # zeros, not empty: a row reads the positions other rows filled, masked; attention weights
        # them by exactly 0, but 0 times a NaN left in unused memory is NaN
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.filled: List[List[int]] = [[0] * rows for _ in range(num_blocks)]  # [block][row]

    def write(self, block: int, rows: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, ends: List[int], row_list: List[int]) -> None:
        """Store keys/values (P, heads, head_dim) of the (row, position) pairs; row_list[i] is now
        filled up to ends[i]."""
        self.keys[block][rows, :, positions] = keys
        self.values[block][rows, :, positions] = values
        filled = self.filled[block]
        for row, end in zip(row_list, ends):
            filled[row] = end

    def read(self, block: int, rows: torch.Tensor, length: int, all_rows: bool):
        """Keys and values of positions 0..length-1 for `rows` (a view when they are all rows)."""
        keys, values = self.keys[block, :, :, :length], self.values[block, :, :, :length]
        if all_rows:
            return keys, values
        return keys.index_select(0, rows), values.index_select(0, rows)

    def truncate(self, row: int, length: int) -> None:
        """Forget positions >= length of one row in every block (rollback)."""
        for filled in self.filled:
            filled[row] = min(filled[row], length)

    def keep(self, rows: torch.Tensor, row_list: List[int]) -> None:
        """Keep only these rows (finished rows leave the batch and cost nothing after)."""
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)
        self.filled = [[filled[r] for r in row_list] for filled in self.filled]
