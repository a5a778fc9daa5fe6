"""Export a trained backbone to ONNX: images [B, 3, S, S] (normalised to [-1, 1]) -> embeddings [B, d].

    python tools/export_onnx.py --checkpoint runs/x/ckpt_last.pt --out model.onnx [--opset 17]

The batch axis is dynamic (any B); the image side S is the checkpoint's ``data.image_size``. The
embedding is the backbone's raw output (not L2-normalised, no flip-sum: do both at inference, as
``tools/extract_features.py`` does). Needs the ``export`` extra (``pip install -e '.[export]'``:
onnx, onnxruntime); with onnxruntime installed the file is checked after writing: ONNX and torch embeddings of a random batch,
max |difference| printed. Exit code 2 with a one-line error on a bad checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hfsoftmax.eval.cli import EvalError, load_model  # noqa: E402

DEFAULT_OPSET = 17
EXTRA = "pip install -e '.[export]'"   # setup.py's extra holding onnx and onnxruntime


def require_onnx() -> None:
    """torch.onnx.export without the onnx package says only "Module onnx is not installed!": say the remedy."""
    try:
        __import__("onnx")
    except ImportError:
        raise EvalError(f"ONNX export needs the onnx package: {EXTRA} (or pip install onnx onnxruntime)") from None


def export(checkpoint: str, out: str, opset: int = DEFAULT_OPSET, arch: str = "auto") -> tuple[int, int]:
    """Write ``out``; returns (image_size, feature_dim)."""
    require_onnx()
    model, size, cfg = load_model(checkpoint, arch)
    model.eval()
    example = torch.zeros(2, 3, size, size)
    with torch.no_grad():
        dim = int(model(example).shape[1])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        # the TorchScript-based exporter: it needs no onnxscript and covers every backbone here
        torch.onnx.export(model, (example,), tmp, input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                          opset_version=int(opset), dynamo=False)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return size, dim


def check(checkpoint: str, onnx_path: str, batch: int = 5, arch: str = "auto") -> float:
    """max |ONNX - torch| over the embeddings of a random batch (needs onnxruntime)."""
    import onnxruntime as ort

    model, size, _ = load_model(checkpoint, arch)
    model.eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = sess.run(["embeddings"], {"images": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.abs(got - want).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a trained backbone to ONNX (dynamic batch).")
    p.add_argument("--checkpoint", required=True, help="ckpt_*.pt written by hfsoftmax.train")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--arch", default="auto", help="backbone name, or auto (from the checkpoint)")
    a = p.parse_args(argv)
    try:
        size, dim = export(a.checkpoint, a.out, a.opset, a.arch)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:   # an operator the exporter cannot express: say which, in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(f"error: ONNX export of {a.checkpoint} failed ({type(e).__name__}): {first}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: images [B, 3, {size}, {size}] in [-1, 1] -> embeddings [B, {dim}], opset {a.opset}, "
          f"dynamic batch")
    try:
        diff = check(a.checkpoint, a.out, arch=a.arch)
        print(f"onnxruntime check: max |onnx - torch| = {diff:.2e}")
    except ImportError:
        print(f"onnxruntime not installed: not checked ({EXTRA})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
