"""ROC plots drawn with Pillow (no matplotlib): one PNG per verification set."""
from __future__ import annotations

import logging
import os
from typing import Sequence

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)


LOG_FPR_MIN = 1e-6   # face verification reads TAR at FAR = 1e-6 .. 1e-1


def save_roc_png(path: str, fpr: Sequence[float], tpr: Sequence[float], title: str,
                 size: tuple[int, int] = (560, 420)) -> None:
    """Draw TPR (linear) against FPR on a log axis from 1e-6 to 1 (the face-verification
    convention; FPR = 0 sits on the left edge), with a grid and the chance curve; atomic write."""
    import math
    if len(fpr) != len(tpr) or not fpr:
        raise ValueError(f"ROC needs equal, non-empty fpr/tpr lists, got {len(fpr)} and {len(tpr)}")
    w, h = size
    left, right, top, bottom = 50, 20, 40, 45
    pw, ph = w - left - right, h - top - bottom
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)

    decades = -math.log10(LOG_FPR_MIN)

    def lx(f: float) -> float:   # FPR -> 0..1 on the log axis
        return min(1.0, max(0.0, (math.log10(f) + decades) / decades)) if f > 0 else 0.0

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * pw, top + (1.0 - y) * ph

    for k in range(int(decades) + 1):  # a vertical line per decade, 1e-6 .. 1
        v = k / decades
        d.line([xy(v, 0), xy(v, 1)], fill=(230, 230, 230))
        x, y = xy(v, 0)
        d.text((x - 12, y + 4), f"1e{k - int(decades)}" if k < decades else "1", fill="black")
    for k in range(11):
        v = k / 10
        d.line([xy(0, v), xy(1, v)], fill=(230, 230, 230))
        if k % 2 == 0:
            x, y = xy(0, v)
            d.text((x - 28, y - 6), f"{v:.1f}", fill="black")
    d.line([xy(lx(10 ** (-decades * (1 - i / 60))), 10 ** (-decades * (1 - i / 60))) for i in range(61)],
           fill=(180, 180, 180))  # chance: TPR = FPR
    d.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    pts = sorted((lx(f), t) for f, t in zip(fpr, tpr))
    d.line([xy(x, y) for x, y in pts], fill=(200, 30, 30), width=2)
    d.text((left, 6), title, fill="black")
    d.text((left + pw // 2 - 60, h - 18), "false positive rate (FPR, log)", fill="black")
    d.text((6, top - 16), "TPR", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
