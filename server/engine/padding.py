"""Right-padding of rows of different lengths into one forward batch."""

from __future__ import annotations

import torch


def pad_rows(rows: list[torch.Tensor], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [rows, longest] and key_mask (True on real tokens). Padding goes on the right so each
    row keeps positions 0..len-1, as it has when run alone."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    key_mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        key_mask[i, : len(row)] = True
    return ids, key_mask


def unconditional(row: torch.Tensor, prompt_len: int, mask_id: int) -> torch.Tensor:
    """The classifier-free-guidance copy: every prompt position masked."""
    copy = row.clone()
    copy[:prompt_len] = mask_id
    return copy
