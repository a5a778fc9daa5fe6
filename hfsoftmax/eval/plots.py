"""ROC plots drawn with Pillow (no matplotlib): one PNG per verification set."""
from __future__ import annotations

import logging
import os
from typing import Sequence

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)


def save_roc_png(path: str, fpr: Sequence[float], tpr: Sequence[float], title: str,
                 size: tuple[int, int] = (480, 420)) -> None:
    """Draw TPR against FPR (both 0..1, linear axes) with a grid and the chance diagonal; atomic write."""
    if len(fpr) != len(tpr) or not fpr:
        raise ValueError(f"ROC needs equal, non-empty fpr/tpr lists, got {len(fpr)} and {len(tpr)}")
    w, h = size
    left, right, top, bottom = 50, 20, 40, 45
    pw, ph = w - left - right, h - top - bottom
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * pw, top + (1.0 - y) * ph

    for k in range(11):  # grid and tick labels every 0.1
        v = k / 10
        d.line([xy(v, 0), xy(v, 1)], fill=(230, 230, 230))
        d.line([xy(0, v), xy(1, v)], fill=(230, 230, 230))
        if k % 2 == 0:
            x, y = xy(v, 0)
            d.text((x - 8, y + 4), f"{v:.1f}", fill="black")
            x, y = xy(0, v)
            d.text((x - 28, y - 6), f"{v:.1f}", fill="black")
    d.line([xy(0, 0), xy(1, 1)], fill=(180, 180, 180))  # chance
    d.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    pts = sorted(zip(fpr, tpr))
    d.line([xy(x, y) for x, y in pts], fill=(200, 30, 30), width=2)
    d.text((left, 6), title, fill="black")
    d.text((left + pw // 2 - 40, h - 18), "false positive rate (FPR)", fill="black")
    d.text((6, top - 16), "TPR", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
