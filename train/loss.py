"""MemSeg's objective (paper Eq. 8-10): 0.6 * L1 + 0.4 * focal (gamma 4) between the predicted anomaly
probability and the synthetic-anomaly mask. The softmax is taken once: focal from ``log_softmax``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 4.0, alpha: float = -1.0) -> torch.Tensor:
    """Logits ``[N, 2, H, W]``, target ``[N, H, W]`` in {0, 1} -> mean focal loss (Lin et al., 2017).
    ``alpha`` in [0, 1] weights the anomaly class (background ``1 - alpha``); negative: unweighted."""
    log_p = F.log_softmax(logits, dim=1)
    t = target.long().unsqueeze(1)
    log_pt = log_p.gather(1, t).squeeze(1)
    pt = log_pt.exp()
    loss = -((1.0 - pt) ** gamma) * log_pt
    if alpha >= 0:
        loss = loss * torch.where(target > 0.5, alpha, 1.0 - alpha)
    return loss.mean()


def memseg_loss(logits: torch.Tensor, target: torch.Tensor, l1_weight: float = 0.6, focal_weight: float = 0.4,
                gamma: float = 4.0, alpha: float = -1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Returns the weighted total and its parts (for logging)."""
    prob = torch.softmax(logits, dim=1)[:, 1]
    l1 = (prob - target).abs().mean()
    focal = focal_loss(logits, target, gamma, alpha)
    total = l1_weight * l1 + focal_weight * focal
    return total, {"l1": float(l1.detach()), "focal": float(focal.detach())}
