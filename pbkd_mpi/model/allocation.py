"""Sharing a parameter target between blocks by how hard each one is to compress.

`student.allocation = "spectrum"`: the low-rank students of single convs share their part
of `student.target_params` so that the sum of their kernels' relative truncation errors is
smallest. A rank-r student starts from the kernel's rank-r SVD, which keeps
sigma_1^2 + ... + sigma_r^2 of the kernel's energy; a kernel with a flat spectrum needs a
higher rank than one whose energy sits in a few directions for the same start. Each width
step goes, greedily, to the block whose kernel gains the most energy per parameter from it
(optimal here: the gains of one block shrink as its rank grows). Other blocks
(multi-layer segments, other families) keep the uniform share. `uniform` gives every block
the same share.
"""

from __future__ import annotations

import heapq
from dataclasses import replace

import numpy as np

from pbkd_mpi.model.graph import flatten_model
from pbkd_mpi.model.students import dense_kernel, student_cost


def energy_shares(kernel: np.ndarray) -> np.ndarray:
    """Each singular direction's share of the kernel's energy, largest first."""
    sigma = np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]), compute_uv=False)
    energy = sigma.astype(np.float64) ** 2
    return energy / max(energy.sum(), 1e-30)


def allocate_by_spectrum(blocks, teacher, target: float, depth_multiplier: int = 1) -> list:
    """`blocks` with the widths of their single-conv low-rank students re-shared as the
    module says; the pool's parameters stay within the target's."""
    pool = [i for i, block in enumerate(blocks)
            if block.family == "low_rank" and block.kind == "conv"]
    if len(pool) < 2:
        return blocks
    flat = flatten_model(teacher)
    convs = {i: flat.get_layer(blocks[i].layers[0]) for i in pool}
    pool = [i for i in pool if getattr(convs[i], "groups", 1) == 1]
    steps, budget, width = {}, 0.0, {}
    for i in pool:
        block = blocks[i]
        one = student_cost(replace(block, width=1), depth_multiplier)[0]
        slope = student_cost(replace(block, width=2), depth_multiplier)[0] - one
        if slope <= 0:
            continue  # a student whose width does not change its size keeps its width
        shares = energy_shares(dense_kernel(convs[i]))
        # A width step adds `depth_multiplier` ranks; the student must stay smaller.
        most = min(len(shares) // depth_multiplier,
                   int((block.teacher_params - 1 - one) // slope) + 1)
        gains = [shares[w * depth_multiplier:(w + 1) * depth_multiplier].sum()
                 for w in range(1, max(most, 1))]
        steps[i] = (slope, gains)
        width[i] = 1
        budget += target * block.teacher_params - one
    heap = [(-gains[0] / slope, i) for i, (slope, gains) in steps.items() if gains]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        slope, gains = steps[i]
        if slope > budget:
            continue  # this block's next step no longer fits; a cheaper one may
        budget -= slope
        width[i] += 1
        if width[i] - 1 < len(gains):
            heapq.heappush(heap, (-gains[width[i] - 1] / slope, i))
    return [replace(block, width=width[i]) if i in width else block
            for i, block in enumerate(blocks)]


def truncation_error(block, teacher, depth_multiplier: int = 1) -> float:
    """The relative error of the block's low-rank start: the energy its rank leaves out."""
    kernel = dense_kernel(flatten_model(teacher).get_layer(block.layers[0]))
    return float(energy_shares(kernel)[block.width * depth_multiplier:].sum())
