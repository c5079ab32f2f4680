"""The ``fxprune`` command line.

    fxprune analyze MODEL [--meta] [--graphml deps.graphml] [--ignore NAME ...] [--coverage]
    fxprune explain MODEL PARAM_OR_GROUP [OTHER]     # why frozen / why coupled
    fxprune prune MODEL --ratio 0.2 [--sequential]   # torchrun --nproc-per-node N -m fxprune prune ...

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
    import transformers

    from fxprune.util.hf import default_example_inputs

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
    return model, default_example_inputs(model)


def _analysis(spec: str, *, meta: bool, ignore: Any = ()) -> Any:
    import fxprune

    model, inputs = load_model(spec, meta=meta)
    graph = fxprune.trace(model, kwargs=inputs)
    return fxprune.analyze(graph, ignore=ignore or ())


def cmd_analyze(args: argparse.Namespace) -> int:
    from fxprune.util.publish import atomic_write_text

    analysis = _analysis(args.model, meta=args.meta, ignore=args.ignore)
    print(analysis.summary(max_rows=None if args.all else 60))
    report = analysis.coverage() if args.coverage else None
    if report is not None:
        print("\nops that froze spaces holding parameters (most costly first):")
        print(report.table(max_rows=None if args.all else 30))
    if args.graphml:
        path = analysis.to_graphml(args.graphml)
        print(f"coupling graph written to {path}")
    if args.json:
        rows = [
            {"id": g.id, "kind": g.kind, "units": g.size, "exact": g.exact,
             "members": [{"name": m.name, "dim": m.dim, "unit_width": m.unit_width} for m in g.members]}
            for g in analysis.groups
        ]
        doc = {"groups": rows, "unsupported": [str(u) for u in analysis.unsupported]}
        if report is not None:
            doc["coverage"] = report.as_dict()
        atomic_write_text(args.json, json.dumps(doc, indent=1))
        print(f"groups written to {args.json}")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    analysis = _analysis(args.model, meta=args.meta, ignore=args.ignore)
    try:
        if args.other:
            print(analysis.why(args.target, args.other))
        else:
            print(analysis.explain(args.target))
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    return EXIT_OK


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved beside a model, or None (transformers 4/5 formats both work)."""
    if not os.path.isdir(path):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - fall back to the raw tokenizers file
        tok_file = os.path.join(path, "tokenizer.json")
        if os.path.exists(tok_file):
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=tok_file)
    return None


def load_any(path: str) -> Any:
    """A model directory written by fxprune (fxprune.json) or a plain HF checkpoint."""
    import fxprune

    if os.path.exists(os.path.join(path, "fxprune.json")):
        return fxprune.load(path)
    model, _ = load_model(path)
    return model


def _calibration(args: argparse.Namespace, tokenizer: Any, inputs: dict) -> Any:
    if not args.calib:
        return None
    if not os.path.exists(args.calib):
        raise FileNotFoundError(f"calibration file {args.calib} does not exist")
    if tokenizer is None:
        raise ValueError("--calib needs a tokenizer: put tokenizer files in the model directory")
    return args.calib


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune in memory, or one block at a time (``--sequential``, or when the model would not fit);
    under torchrun every rank scores its shard of the calibration data and rank 0 writes."""
    from fxprune.distributed import init_distributed
    from fxprune.util.publish import Publication

    out_dir = args.out or (args.model.rstrip("/") + "-pruned")
    pub = Publication(out_dir, overwrite=args.overwrite, protect=[args.model, args.calib])
    dist = init_distributed()
    main_rank = dist is None or dist.is_main
    try:
        sequential = args.sequential
        if sequential is None and os.path.isdir(args.model):
            from fxprune.passes.sequential import needs_sequential

            sequential, why = needs_sequential(args.model, args.device)
            if sequential and main_rank:
                print(f"fxprune: pruning one block at a time (--sequential): {why}")
        if sequential and not os.path.isdir(args.model):
            raise ValueError("--sequential streams a checkpoint: MODEL must be a local HF directory")
        tokenizer = load_tokenizer(args.model)
        if sequential:
            result, save = _prune_sequential(args, tokenizer, dist)
        else:
            result, save = _prune_in_memory(args, tokenizer, dist)
        if main_rank:
            print(result.report.table())
            with pub:
                _write_pruned(pub, args, result.report, tokenizer, save)
            print(f"pruned model, report.md and report.html written to {out_dir}")
        if dist is not None:
            dist.barrier()
    finally:
        if dist is not None:
            dist.close()
    return EXIT_OK


def _prune_in_memory(args: argparse.Namespace, tokenizer: Any, dist: Any) -> tuple[Any, Any]:
    import fxprune
    from fxprune.io import save_into

    model, inputs = load_model(args.model)
    calib = _calibration(args, tokenizer, inputs)
    result = fxprune.prune(
        model, args.ratio, example_inputs=inputs, calib=calib, tokenizer=tokenizer,
        importance=args.importance, allocation=args.allocation, round_to=args.round_to, shots=args.shots,
        n_samples=args.n_samples, seq_len=args.seq_len, device=args.device, seed=args.seed,
        progress=not args.quiet, distributed=dist,
    )
    extra = {"source": os.path.abspath(args.model), "plan": result.plan.as_dict()}
    return result, lambda tmp: save_into(result, tmp, extra=extra)


def _prune_sequential(args: argparse.Namespace, tokenizer: Any, dist: Any) -> tuple[Any, Any]:
    from fxprune.passes.sequential import prune_sequential, save_sequential_into

    if args.shots not in ("auto", 1):
        raise ValueError("--sequential prunes in one shot: drop --shots (or use --no-sequential)")
    calib = _calibration(args, tokenizer, None)
    chosen = {k: v for k, v in (("importance", args.importance), ("allocation", args.allocation)) if v}
    result = prune_sequential(
        args.model, args.ratio, calib=calib, tokenizer=tokenizer, **chosen, round_to=args.round_to,
        n_samples=args.n_samples, seq_len=args.seq_len, device=args.device, seed=args.seed, distributed=dist, offload_dir=args.offload_dir,
        progress=not args.quiet,
    )
    if not args.quiet and (dist is None or dist.is_main):
        blocks = [t for t in result.run.timings if t.block.startswith(tuple(result.cut.blocks))]
        per = sum(t.total_s for t in blocks) / max(len(blocks), 1)
        peak = result.run.activation_bytes
        print(f"sequential: {len(result.cut.blocks)} blocks, {per:.1f} s per block pass, saved activations "
              f"{peak['activations_ram_peak_bytes'] / 2**20:.0f} MiB in RAM, "
              f"{peak['activations_disk_peak_bytes'] / 2**20:.0f} MiB on disk")
    extra = {"source": os.path.abspath(args.model)}
    return result, lambda tmp: save_sequential_into(result, tmp, progress=not args.quiet, extra=extra)


def _write_pruned(pub: Any, args: argparse.Namespace, report: Any, tokenizer: Any, save: Any) -> None:
    from fxprune.report import write_report

    tmp = str(pub.tmp)
    save(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "prune_report.json"), "w") as f:
        json.dump(report.to_dict(), f, indent=1, default=str)
    write_report(tmp, f"fxprune: {os.path.basename(args.model.rstrip('/'))} pruned by {args.ratio:.0%}",
                 report.headline(), prune_report=report, sections={"Details": report.table()})
    pub.commit()


def cmd_eval(args: argparse.Namespace) -> int:
    from fxprune.calib import load_calibration
    from fxprune.evaluate import embedding_similarity, is_causal_lm, perplexity

    if not os.path.exists(args.data):
        raise FileNotFoundError(f"data file {args.data} does not exist")
    model = load_any(args.dir)
    tokenizer = load_tokenizer(args.dir)
    if tokenizer is None:
        raise ValueError(f"{args.dir} has no tokenizer files")
    batches = load_calibration(args.data, tokenizer=tokenizer, n_samples=args.n_samples, seq_len=args.seq_len,
                               seed=args.seed, batch_size=args.batch_size)
    if is_causal_lm(model):
        print(f"perplexity: {perplexity(model, batches):.3f}")
        return EXIT_OK
    ref_path = args.reference or _recorded_source(args.dir)
    if ref_path is None:
        raise ValueError("encoders are evaluated against a reference model: pass --reference DIR")
    print(f"embedding cosine similarity to {ref_path}: {embedding_similarity(model, load_any(ref_path), batches):.4f}")
    return EXIT_OK


def _save_dir(model: Any, out_dir: str, overwrite: bool, tokenizer: Any, extra: dict, title: str,
              headline: list, sections: dict, protect: tuple = ()) -> None:
    from fxprune.io import save_into
    from fxprune.report import write_report
    from fxprune.util.publish import publish_dir

    with publish_dir(out_dir, overwrite=overwrite, protect=protect) as tmp:
        if model is not None:
            save_into(model, str(tmp), extra=extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_report(str(tmp), title, headline, sections=sections)


def cmd_recover(args: argparse.Namespace) -> int:
    from fxprune.passes.recovery import recover

    if not os.path.exists(args.data):
        raise FileNotFoundError(f"data file {args.data} does not exist")
    from fxprune.util.publish import check_destination

    out_dir = args.out or (args.dir.rstrip("/") + "-recovered")
    protect = (args.dir, args.data, args.teacher)
    check_destination(out_dir, overwrite=args.overwrite, protect=[p for p in protect if p and os.path.exists(p)])
    model = load_any(args.dir)
    tokenizer = load_tokenizer(args.dir)
    teacher = None
    if "distill" in args.method:
        source = args.teacher or _recorded_source(args.dir)
        if source is None:
            raise ValueError("--method distill needs the dense model: pass --teacher DIR")
        teacher = load_any(source)
    rec = recover(model, args.data, method=args.method, teacher=teacher, tokenizer=tokenizer,
                  seq_len=args.seq_len, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  device=args.device, progress=not args.quiet)
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    headline = [("", "before", "after"), ("eval loss", fmt(rec.loss_before), fmt(rec.loss_after)),
                ("perplexity", fmt(rec.ppl_before), fmt(rec.ppl_after)),
                ("distillation loss", fmt(rec.distill_before), fmt(rec.distill_after))]
    for row in headline:
        print("  ".join(str(c).ljust(18) for c in row))
    _save_dir(rec.model, out_dir, args.overwrite, tokenizer, {"source": _recorded_source(args.dir) or args.dir},
              f"fxprune recover ({args.method}, {rec.steps} steps)", headline, {}, protect=protect)
    print(f"recovered model and report written to {out_dir}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from fxprune.passes.capture import default_example_inputs
    from fxprune.passes.export import export_onnx

    model = load_any(args.dir)
    config = getattr(model, "config", None)
    inputs = default_example_inputs(model) if config is not None else None
    if inputs is None:
        raise ValueError("export needs a model with a config (HF) to build example inputs")
    inputs = {k: v[:, :8] if v.dim() == 2 else v for k, v in inputs.items()}
    res = export_onnx(model, args.onnx, example_inputs=inputs, kv_cache=args.kv_cache, overwrite=args.overwrite)
    print(f"ONNX written to {res.path} ({res.file_size / 1e6:.1f} MB); ONNX Runtime parity at "
          f"{res.check_shapes}: max |diff| {res.max_abs_diff:.2e} ({', '.join(res.providers)})")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    from fxprune.evaluate import is_causal_lm
    from fxprune.passes.capture import default_example_inputs
    from fxprune.passes.export import export_onnx
    from fxprune.runtime import benchmark_forward, benchmark_latency

    dense_dir = args.dense or _recorded_source(args.dir)
    if dense_dir is None:
        raise ValueError("bench compares with the dense model: pass --dense DIR")
    out_dir = args.out or os.path.join(args.dir.rstrip("/") + "-bench")
    if os.path.exists(out_dir) and not args.overwrite:
        raise FileExistsError(f"output directory {out_dir} exists; pass --overwrite to replace it")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in (("dense", dense_dir), ("pruned", args.dir)):
            model = load_any(path)
            inputs = {k: v[:, :8] if v.dim() == 2 else v for k, v in default_example_inputs(model).items()}
            causal = is_causal_lm(model)
            onnx_path = os.path.join(tmp, f"{label}.onnx")
            exported = export_onnx(model, onnx_path, example_inputs=inputs, kv_cache=causal)
            params = sum(p.numel() for p in model.parameters())
            if causal:
                lat = benchmark_latency(exported, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                                        repeats=args.repeats)
                rows.append((label, params, lat.prefill_ms, lat.decode_ms_per_token))
            else:
                fwd = benchmark_forward(exported, default_example_inputs(model), repeats=args.repeats)
                rows.append((label, params, fwd.forward_ms, None))
    d, p = rows
    headline = [("", "dense", "pruned", "speedup"), ("parameters", f"{d[1]:,}", f"{p[1]:,}", "")]
    headline.append(("prefill / forward (ms)", f"{d[2]:.2f}", f"{p[2]:.2f}", f"{d[2] / p[2]:.2f}x"))
    if d[3] is not None:
        headline.append(("decode (ms/token)", f"{d[3]:.2f}", f"{p[3]:.2f}", f"{d[3] / p[3]:.2f}x"))
    for row in headline:
        print("  ".join(str(c).ljust(22) for c in row))
    _save_dir(None, out_dir, args.overwrite, None, {}, "fxprune bench: ONNX Runtime latency", headline, {})
    print(f"report written to {out_dir}")
    return EXIT_OK


def _recorded_source(path: str) -> str | None:
    try:
        with open(os.path.join(path, "fxprune.json")) as f:
            return json.load(f).get("source")
    except (OSError, ValueError):
        return None


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
    p.add_argument("--coverage", action="store_true",
                   help="also list each op that froze something: the spaces, the parameters they hold, "
                        "the source line (sorted by parameters)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("explain", help="why a parameter is frozen, or why two parameters are coupled")
    p.add_argument("model", help="local HF model directory, or module:factory returning (model, kwargs)")
    p.add_argument("target", help="a group id, a parameter name, or NAME:DIM")
    p.add_argument("other", nargs="?", help="a second group/parameter: explain why the two are coupled")
    p.add_argument("--meta", action="store_true", help="build from config on the meta device (no weights)")
    p.add_argument("--ignore", nargs="*", help="parameter or module name prefixes to keep unchanged")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("prune", help="score, plan and remove a fraction of the parameters")
    p.add_argument("model", help="local HF model directory, or module:factory returning (model, kwargs)")
    p.add_argument("--ratio", type=float, required=True, help="fraction of all parameters to remove, in [0, 1)")
    p.add_argument("--importance", default=None,
                   help="surgeon, obs, taylor, taylor-element, taylor-2, l1, l2, activation, flap, random "
                        "(default: fxprune.api.DEFAULT_IMPORTANCE with --calib, l2 without)")
    p.add_argument("--calib", help="calibration text: .txt/.json/.jsonl/.parquet (needs tokenizer files)")
    p.add_argument("--allocation", default=None, choices=["uniform", "global", "cost"],
                   help="default: cost (removal cost per parameter, every width kind) for surgeon/obs, else uniform")
    p.add_argument("--shots", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="prune in N steps of a linear schedule, re-gathering statistics each shot "
                        "(default auto: one shot per 20%% removed for surgeon/obs, else 1)")
    p.add_argument("--round-to", type=int, default=1, help="keep pruned sizes a multiple of N (64/128 on GPU)")
    p.add_argument("--n-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=128, help="calibration window length (default 128)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output directory (default MODEL-pruned); refused if it exists")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="one block at a time from the checkpoint (default: only when in-memory pruning would "
                        "not fit in RAM/GPU memory)")
    p.add_argument("--offload-dir", help="where sequential mode spills block activations that do not fit in RAM")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity (causal LMs) or embedding similarity (encoders)")
    p.add_argument("dir", help="model directory (pruned by fxprune or a plain HF checkpoint)")
    p.add_argument("--data", required=True, help="evaluation text file")
    p.add_argument("--reference", help="dense model directory for encoder similarity (default: the pruned model's source)")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("recover", help="LoRA fine-tuning or distillation of a pruned model, merged")
    p.add_argument("dir", help="pruned model directory")
    p.add_argument("--data", required=True, help="text (.txt) or Alpaca-format (.json/.jsonl) data")
    p.add_argument("--method", default="lora", choices=["lora", "distill", "lora+distill"])
    p.add_argument("--teacher", help="dense model directory for distillation (default: the recorded source)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output directory (default DIR-recovered)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("export", help="export to ONNX with dynamic batch/seq and an ORT parity check")
    p.add_argument("dir", help="model directory")
    p.add_argument("--onnx", required=True, help="output .onnx path (refused if it exists)")
    p.add_argument("--kv-cache", action="store_true", help="decoder with past/present key values")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="ONNX Runtime latency of a pruned model against its dense source")
    p.add_argument("dir", help="pruned model directory")
    p.add_argument("--dense", help="dense model directory (default: the recorded source)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", help="report directory (default DIR-bench)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_bench)
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
