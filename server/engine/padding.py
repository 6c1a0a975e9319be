"""Rows of different lengths in forward batches: right-padding, grouping by length, and the
classifier-free-guidance copy.

MAX_PADDING_WASTE: rows whose padding to a common length would waste more than this share of
the positions run as separate forwards (each still batched; the LM head after them is shared).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.engine.model import LLaDAModel

MAX_PADDING_WASTE = 0.25


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


def length_groups(lengths: list[int], max_waste: float) -> list[list[int]]:
    """Row indices in groups (shortest first) such that padding each group to its longest row
    wastes at most max_waste of the group's positions. Each group is one forward: rows of very
    different lengths do not pay for each other's padding."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups:
            candidate = real + lengths[i]
            if 1 - candidate / ((len(groups[-1]) + 1) * lengths[i]) <= max_waste:
                groups[-1].append(i)
                real = candidate
                continue
        groups.append([i])
        real = lengths[i]
    return groups


def hidden_at(
    model: LLaDAModel, rows: list[torch.Tensor], positions: list[torch.Tensor], pad_id: int, max_waste: float
) -> list[torch.Tensor]:
    """Each row's final hidden states at its positions. The rows run in length groups, one forward
    per group, so that only the positions the LM head needs outlive the forward."""
    selected: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for group in length_groups([len(row) for row in rows], max_waste):
        ids, key_mask = pad_rows([rows[i] for i in group], pad_id, model.device)
        hidden = model(ids, key_mask)
        for k, i in enumerate(group):
            selected[i] = hidden[k, positions[i]]
    return selected


def unconditional(row: torch.Tensor, prompt_len: int, mask_id: int) -> torch.Tensor:
    """The classifier-free-guidance copy: every prompt position masked."""
    copy = row.clone()
    copy[:prompt_len] = mask_id
    return copy
