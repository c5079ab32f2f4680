"""Prune a vision model (a ViT or a CNN), then export it to ONNX and check it in ONNX Runtime.

Run: python examples/vision.py [--model DIR] [--ratio 0.3]
     (default: a tiny random ViT built from ViTConfig; --cnn for a ResNet-style CNN)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxprune  # noqa: E402


def tiny_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=160)
    return ViTModel(cfg, add_pooling_layer=False).eval(), cfg.image_size


def tiny_resnet():
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    return ResNetModel(cfg).eval(), 32


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="local HF vision model directory")
    ap.add_argument("--cnn", action="store_true", help="use the tiny ResNet instead of the tiny ViT")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--importance", default="l2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.model:
        from transformers import AutoConfig, AutoModel

        model = AutoModel.from_pretrained(args.model).eval()
        size = getattr(AutoConfig.from_pretrained(args.model), "image_size", 224)
    else:
        model, size = tiny_resnet() if args.cnn else tiny_vit()
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    result = fxprune.prune(model, args.ratio, example_inputs={"pixel_values": images},
                           calib=[{"pixel_values": images}], importance=args.importance, progress=False)
    print(result.report.table())
    from fxprune.passes.export import export_onnx

    out = args.out or os.path.join(tempfile.mkdtemp(), "vision.onnx")
    exported = export_onnx(result.model, out, example_inputs={"pixel_values": images[:2]})
    print(f"ONNX written to {exported.path}; ORT parity at batch {exported.check_shapes}: max |diff| {exported.max_abs_diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
