"""Attention-head-structured matching: heads first on a head-level cost, then units within heads.

For an attention module with H heads of D units, the symmetries wgen uses are a permutation of the
heads (shared by q, k, v and the output projection's input), a within-head permutation shared by q
and k, and a separate within-head permutation for v (and the projection's input). Within-head
permutations are chosen per head, unless q/k norms with weights force one for all heads.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .groups import HeadGroup

SEGMENT_KINDS = ("qk", "v")


def head_similarities(group: HeadGroup, template: dict[str, torch.Tensor], member: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """Return ``{"qk": S, "v": S}`` with ``S[i, j, d, e]`` = <template head i unit d, member head j unit e>.

    A shared ``qk_norm`` axis adds its ``[d, e]`` similarity to every head pair of ``"qk"``.
    """
    H, D = group.num_heads, group.head_dim
    sims = {kind: None for kind in SEGMENT_KINDS}
    shared = None
    for key, axis, layout in group.axes:
        t = template[key].movedim(axis, 0).reshape(template[key].shape[axis], -1).float()
        w = member[key].movedim(axis, 0).reshape(member[key].shape[axis], -1).float()
        offset = 0
        for kind in layout:
            if kind == "qk_norm":
                part = t[offset:offset + D] @ w[offset:offset + D].T
                shared = part if shared is None else shared + part
                offset += D
                continue
            ts = t[offset:offset + H * D].reshape(H, D, -1)
            ws = w[offset:offset + H * D].reshape(H, D, -1)
            part = torch.einsum("idr,jer->ijde", ts, ws)
            sims[kind] = part if sims[kind] is None else sims[kind] + part
            offset += H * D
    for kind in SEGMENT_KINDS:
        if sims[kind] is None:
            sims[kind] = torch.zeros(H, H, D, D, dtype=torch.float32, device=next(iter(member.values())).device)
    if shared is not None:
        sims["qk"] = sims["qk"] + shared
    return sims


def solve_heads(group: HeadGroup, sims: dict[str, torch.Tensor]
                ) -> tuple[np.ndarray, dict[str, np.ndarray], float, float]:
    """Return ``(sigma, within, new_score, old_score)`` maximising the summed similarity.

    ``sigma[i]`` is the member head placed at head i; ``within[kind][i]`` the member unit placed at
    unit d of head i. ``old_score`` is the similarity with no change (identity everywhere).
    """
    H, D = group.num_heads, group.head_dim
    cpu = {kind: s.double().cpu().numpy() for kind, s in sims.items()}
    pair_perm = {kind: np.zeros((H, H, D), dtype=np.int64) for kind in SEGMENT_KINDS}
    head_cost = np.zeros((H, H))
    for kind in SEGMENT_KINDS:
        for i in range(H):
            for j in range(H):
                rows, cols = linear_sum_assignment(cpu[kind][i, j], maximize=True)
                pair_perm[kind][i, j] = cols
                head_cost[i, j] += cpu[kind][i, j][rows, cols].sum()
    _, sigma = linear_sum_assignment(head_cost, maximize=True)
    within = {kind: pair_perm[kind][np.arange(H), sigma] for kind in SEGMENT_KINDS}
    if group.shared_qk:  # one q/k permutation for every head, chosen on the matched heads
        total = sum(cpu["qk"][i, sigma[i]] for i in range(H))
        _, cols = linear_sum_assignment(total, maximize=True)
        within["qk"] = np.tile(cols, (H, 1))
    new = sum(cpu[kind][i, sigma[i]][np.arange(D), within[kind][i]].sum() for kind in SEGMENT_KINDS for i in range(H))
    old = sum(np.trace(cpu[kind][i, i]) for kind in SEGMENT_KINDS for i in range(H))
    return sigma, within, float(new), float(old)


def layout_index(layout: tuple[str, ...], num_heads: int, head_dim: int, sigma: np.ndarray,
                 within: dict[str, np.ndarray]) -> torch.Tensor:
    """Return the gather index of one parameter axis with ``layout`` under a head permutation."""
    H, D = num_heads, head_dim
    parts, offset = [], 0
    for kind in layout:
        if kind == "qk_norm":
            parts.append(offset + torch.as_tensor(within["qk"][0]))
            offset += D
            continue
        idx = sigma[:, None] * D + within[kind]  # [H, D]: member unit placed at (head i, unit d)
        parts.append(offset + torch.as_tensor(idx.reshape(-1)))
        offset += H * D
    return torch.cat(parts).long()
