"""Face boxes [x, y, w, h]: one IoU (vectorised) and one greedy non-maximum suppression."""
from __future__ import annotations

import numpy as np


def iou(a, b) -> float | np.ndarray:
    """Intersection over union of [x, y, w, h] boxes, broadcast over leading axes: two boxes give a float,
    a box against [N, 4] gives [N], a[:, None] against b[None] gives every pair [N, M]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ix = np.maximum(0.0, np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0]))
    iy = np.maximum(0.0, np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1]))
    inter = ix * iy
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    out = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return float(out) if out.ndim == 0 else out


def nms(boxes, scores, threshold: float) -> list[int]:
    """Indices of the boxes kept, best score first: each box that overlaps a better kept one by more
    than `threshold` IoU is dropped."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    keep: list[int] = []
    while order.size:
        best, order = int(order[0]), order[1:]
        keep.append(best)
        order = order[iou(boxes[best], boxes[order]) <= threshold]
    return keep
