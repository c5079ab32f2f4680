"""The ``fxprune`` command line.

    fxprune analyze MODEL [--meta] [--graphml deps.graphml] [--ignore NAME ...]

MODEL is a local Hugging Face model directory (config.json + weights) or ``module:factory``, a
Python callable that returns an ``nn.Module`` (and optionally example inputs, see
``load_model``).  Errors print one line; ``--debug`` shows the traceback.  Exit codes: 0 ok,
2 bad input (missing path, bad argument), 3 the model could not be traced, 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_CAPTURE = 0, 1, 2, 3


def load_model(spec: str, *, meta: bool = False) -> tuple[Any, dict]:
    """Return (model, example kwargs) for a local HF directory or a ``module:factory`` path."""
    import torch

    if os.path.isdir(spec):
        return _load_hf_dir(spec, meta=meta)
    if ":" in spec and not os.path.exists(spec):
        module_name, _, attr = spec.partition(":")
        sys.path.insert(0, os.getcwd())
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise FileNotFoundError(f"cannot import {spec}: {exc}") from exc
        made = factory()
        if isinstance(made, tuple):
            model, inputs = made
        else:
            model, inputs = made, getattr(made, "example_inputs", None)
        if inputs is None:
            raise ValueError(f"{spec} returned a model without example inputs; return (model, kwargs)")
        return model.eval(), inputs
    raise FileNotFoundError(f"model path {spec} does not exist (expected a local HF directory or module:factory)")


def _load_hf_dir(path: str, *, meta: bool) -> tuple[Any, dict]:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel._model_mapping[type(config)]
    if meta:
        import fxprune

        model = fxprune.meta_model(cls._from_config, config)
    else:
        model = cls.from_pretrained(path).eval()
    return model, _example_inputs(config, model)


def _example_inputs(config: Any, model: Any) -> dict:
    import inspect

    import torch

    params = inspect.signature(model.forward).parameters
    device = "meta" if next(model.parameters()).device.type == "meta" else "cpu"
    if "pixel_values" in params and "input_ids" not in params:
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        chans = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(2, chans, size, size, device=device)}
    vocab = getattr(config, "vocab_size", 100)
    ids = torch.randint(0, max(2, min(vocab, 1000)), (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids.to(device)}
    if "attention_mask" in params:
        inputs["attention_mask"] = torch.ones_like(ids).to(device)
    return inputs


def cmd_analyze(args: argparse.Namespace) -> int:
    import fxprune

    model, inputs = load_model(args.model, meta=args.meta)
    graph = fxprune.trace(model, kwargs=inputs)
    fxprune.analyze(graph, ignore=args.ignore or ())
    print(graph.summary(max_rows=None if args.all else 60))
    if args.graphml:
        path = graph.to_graphml(args.graphml)
        print(f"dependency graph written to {path}")
    if args.json:
        rows = [
            {"id": g.id, "kind": g.kind, "units": g.size, "exact": g.exact,
             "members": [{"name": m.name, "dim": m.dim, "unit_width": m.unit_width} for m in g.members]}
            for g in graph.groups
        ]
        with open(args.json, "w") as f:
            json.dump({"groups": rows, "unsupported": [str(u) for u in graph.unsupported]}, f, indent=1)
        print(f"groups written to {args.json}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxprune",
        description="Structured pruning as compiler passes over torch.export graphs.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="trace a model and print its coupled dependency groups")
    p.add_argument("model", help="local HF model directory, or module:factory returning (model, kwargs)")
    p.add_argument("--meta", action="store_true", help="build from config on the meta device (no weights)")
    p.add_argument("--graphml", help="write the group/parameter graph as GraphML")
    p.add_argument("--json", help="write the groups as JSON")
    p.add_argument("--ignore", nargs="*", help="parameter or module name prefixes to keep unchanged")
    p.add_argument("--all", action="store_true", help="list every group (default: first 60)")
    p.set_defaults(func=cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fxprune.errors import CaptureError, FxpruneError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.simplefilter("ignore")
            return args.func(args)
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        code, msg = EXIT_BAD_INPUT, str(exc)
    except CaptureError as exc:
        code, msg = EXIT_CAPTURE, str(exc).splitlines()[0]
    except FxpruneError as exc:
        code, msg = EXIT_ERROR, str(exc)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        code, msg = EXIT_ERROR, f"{type(exc).__name__}: {exc}"
    if args.debug:
        raise
    print(f"fxprune: error: {msg}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
