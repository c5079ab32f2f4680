"""The ``fxprune`` command line.

    fxprune analyze MODEL [--meta] [--graphml deps.graphml] [--ignore NAME ...] [--coverage]
    fxprune explain MODEL PARAM_OR_GROUP [OTHER]     # why frozen / why coupled
    fxprune prune MODEL --ratio 0.2 [--sequential]   # torchrun --nproc-per-node N -m fxprune prune ...

MODEL is a local Hugging Face model directory (config.json + weights) or ``module:factory``, a
Python callable that returns an ``nn.Module`` (and optionally example inputs, see
``load_model``).

Every argument, path, permission and data file is checked before a model is loaded (each
subcommand's ``check_*`` function), so a typo fails in a second, not after the model loaded.
Errors print one line naming the file, parameter or source line; ``--debug`` shows the
traceback.  Exit codes: 0 ok, 2 bad input (an argument, a path, a file's contents), 3 the model
could not be traced, 1 anything else fxprune refused, 130 interrupted (SIGINT or SIGTERM: the
run stops, removes its temporary files and publishes nothing; see fxprune.util.interrupts).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import warnings
from typing import Any

from fxprune.errors import (
    BadInputError,
    CaptureError,
    DataError,
    ExportError,
    FxpruneError,
    ModelLoadError,
)

from fxprune.errors import EXIT_BAD_INPUT, EXIT_CAPTURE, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK  # noqa: F401

_log = logging.getLogger("fxprune")

DATA_FILES = (".txt/.text/.md = one document (the whole file, tokenised and cut into windows); "
              ".json/.jsonl/.parquet/.csv = records with a text field")


def _factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {module_name!r} for {spec}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"{module_name} has no callable {attr!r} (from {spec})")
    return factory


def load_model(spec: str, *, meta: bool = False) -> tuple[Any, dict]:
    """Return (model, example kwargs) for a local HF directory or a ``module:factory`` path."""
    if os.path.isdir(spec):
        return _load_hf_dir(spec, meta=meta)
    if ":" in spec and not os.path.exists(spec):
        made = _factory(spec)()
        if isinstance(made, tuple):
            model, inputs = made
        else:
            model, inputs = made, getattr(made, "example_inputs", None)
        if inputs is None:
            raise ModelLoadError(f"{spec} returned a model without example inputs; return (model, kwargs)")
        return model.eval(), inputs
    raise ModelLoadError(f"model path {spec} does not exist (expected a local HF directory or module:factory)")


def _load_hf_dir(path: str, *, meta: bool) -> tuple[Any, dict]:
    import transformers

    from fxprune.io import WEIGHT_FILES, check_model_dir
    from fxprune.util.hf import default_example_inputs
    from fxprune.util.publish import note_input

    check_model_dir(path)
    note_input(path)
    config_file = os.path.join(path, "config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"{config_file} cannot be used by transformers: {str(exc).splitlines()[0]}") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        try:
            cls = transformers.AutoModel._model_mapping[type(config)]
        except KeyError:
            raise ModelLoadError(f"{config_file}: transformers has no model class for {type(config).__name__}") from None
    if meta:
        import fxprune

        model = fxprune.meta_model(cls._from_config, config)
    else:
        try:
            model = cls.from_pretrained(path).eval()
        except Exception as exc:  # noqa: BLE001 - name the weights file, one line
            files = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
            where = os.path.join(path, files[0]) if files else path
            raise ModelLoadError(f"{where} cannot be loaded: {type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
    return model, default_example_inputs(model)


def _analysis(spec: str, *, meta: bool, ignore: Any = ()) -> Any:
    import fxprune

    model, inputs = load_model(spec, meta=meta)
    graph = fxprune.trace(model, kwargs=inputs)
    return fxprune.analyze(graph, ignore=ignore or ())


def cmd_analyze(args: argparse.Namespace) -> int:
    from fxprune.util.publish import atomic_write_text

    analysis = _analysis(args.model, meta=args.meta, ignore=args.ignore)
    for path in (args.graphml, args.json):  # the run took a while: refuse what appeared meanwhile
        _check_out(path, args.overwrite, [args.model], "output file")
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
        raise BadInputError(exc.args[0]) from None
    return EXIT_OK


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved beside a model, or None (transformers 4/5 formats both work)."""
    if not os.path.isdir(path):
        return None
    try:
        from transformers import AutoTokenizer

        # a per-layer checkpoint fxprune wrote maps its config to modeling_fxprune.py, which
        # AutoTokenizer loads too: that code is fxprune's own
        ours = os.path.isfile(os.path.join(path, "fxprune.json"))
        return AutoTokenizer.from_pretrained(path, **({"trust_remote_code": True} if ours else {}))
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
    if tokenizer is None:
        raise DataError(f"--calib needs a tokenizer, and none could be loaded from {args.model}")
    return args.calib


# ------------------------------------------------------------------------------------------
# Checks that run before any model is loaded
# ------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")


def check_model(spec: str, what: str = "model") -> None:
    """A model argument: an HF/fxprune directory whose files look right, or an importable factory."""
    from fxprune.io import check_model_dir

    if ":" in spec and not os.path.exists(spec):
        _factory(spec)
        return
    if not os.path.exists(spec):
        raise ModelLoadError(f"{what} path {spec} does not exist (expected a local HF directory or module:factory)")
    check_model_dir(spec)


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


def check_tokenizer(path: str, flag: str) -> None:
    if not _has_tokenizer(path):
        raise DataError(f"{flag} needs a tokenizer: {path} has none of {', '.join(TOKENIZER_FILES[:4])}...")


def check_data(path: str, flag: str, what: str) -> None:
    from fxprune.util.text import check_data_file

    check_data_file(path, what, deep=True)


def check_positive(**values: Any) -> None:
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise BadInputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


def check_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInputError(f"--device {device!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"--device {device}: no CUDA device is visible (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise BadInputError(f"--device {device}: MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise BadInputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")


def _check_out(path: str | None, overwrite: bool, inputs: list, what: str = "output") -> None:
    from fxprune.util.publish import check_destination

    if path:
        check_destination(path, overwrite=overwrite, protect=[p for p in inputs if p], what=what)


def _reserve(args: argparse.Namespace, path: str, inputs: list) -> None:
    """Check the output directory and reserve it for the run (its lock is held from the start,
    so a second run into the same --out fails at once instead of after its work)."""
    from fxprune.util.publish import Publication

    if not _writing_rank():  # under torchrun only rank 0 writes (and holds the lock)
        args.reserved = None
        return
    args.reserved = Publication(path, overwrite=args.overwrite, protect=[p for p in inputs if p],
                                what="output directory")


def _writing_rank() -> bool:
    """Whether this process writes outputs: always, except the ranks > 0 of a torchrun launch."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _check_export_runtime() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)} (pip install fxprune[onnx])")


def check_analyze(args: argparse.Namespace) -> None:
    check_model(args.model)
    for path in (args.graphml, args.json):
        _check_out(path, args.overwrite, [args.model], "output file")


def check_explain(args: argparse.Namespace) -> None:
    check_model(args.model)


def check_prune(args: argparse.Namespace) -> None:
    from fxprune.api import check_prune_arguments

    check_prune_arguments(ratio=args.ratio, importance=args.importance, allocation=args.allocation,
                          round_to=args.round_to, n_samples=args.n_samples, seq_len=args.seq_len)
    if args.seed < 0:
        raise BadInputError(f"--seed must be >= 0, got {args.seed}")
    check_device(args.device)
    check_model(args.model)
    if args.calib:
        check_data(args.calib, "--calib", "calibration file")
        if ":" not in args.model or os.path.isdir(args.model):
            check_tokenizer(args.model, "--calib")
    _reserve(args, args.out or (args.model.rstrip("/") + "-pruned"), [args.model, args.calib])


def check_eval(args: argparse.Namespace) -> None:
    check_positive(n_samples=args.n_samples, seq_len=args.seq_len, batch_size=args.batch_size)
    check_model(args.dir)
    check_tokenizer(args.dir, "eval")
    check_data(args.data, "--data", "data file")
    if args.reference:
        check_model(args.reference, "--reference")


def check_recover(args: argparse.Namespace) -> None:
    import math

    check_positive(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len)
    if not (isinstance(args.lr, float) and math.isfinite(args.lr) and args.lr > 0):
        raise BadInputError(f"--lr must be a positive number, got {args.lr!r}")
    check_device(args.device)
    check_model(args.dir)
    check_data(args.data, "--data", "data file")
    if os.path.splitext(args.data)[1].lower() in (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".parquet"):
        check_tokenizer(args.dir, "recover --data")
    if args.teacher:
        check_model(args.teacher, "--teacher")
    args.method = _recover_method(args.dir, args.method)
    if "distill" in args.method and not args.teacher:
        source = _recorded_source(args.dir)
        if source is None:
            raise BadInputError(f"--method {args.method} needs the dense model: pass --teacher DIR")
        check_model(source, "the recorded source model (the distillation teacher)")
    if args.method != "distill" and not _is_causal_lm_dir(args.dir):
        raise BadInputError(f"--method {args.method} trains the next-token loss, which {args.dir} (not a causal LM) "
                            "has not: use --method distill (teacher: the dense model)")
    _reserve(args, args.out or (args.dir.rstrip("/") + "-recovered"), [args.dir, args.data, args.teacher])


def _is_causal_lm_dir(path: str) -> bool:
    """Whether a checkpoint's config names a causal-LM class (read before any model is loaded)."""
    from fxprune.checkpoint import transformer_dir

    try:
        with open(os.path.join(transformer_dir(path), "config.json"), encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return True  # no config to read: let recover() decide
    return not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _recover_method(path: str, method: str) -> str:
    """``--method auto``: LoRA on the next-token loss for causal LMs, distillation otherwise."""
    if method != "auto":
        return method
    return "lora" if _is_causal_lm_dir(path) else "distill"


def check_export(args: argparse.Namespace) -> None:
    check_model(args.dir)
    if not args.onnx.endswith(".onnx"):
        raise BadInputError(f"--onnx {args.onnx}: give a path ending in .onnx")
    _check_out(args.onnx, args.overwrite, [args.dir], "ONNX file")
    _check_export_runtime()


def check_bench(args: argparse.Namespace) -> None:
    check_positive(prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, repeats=args.repeats)
    check_model(args.dir)
    if args.dense:
        check_model(args.dense, "--dense")
    elif _recorded_source(args.dir) is None:
        raise BadInputError("bench compares with the dense model: pass --dense DIR")
    else:
        check_model(_recorded_source(args.dir), "the recorded source model")
    _check_export_runtime()
    _reserve(args, args.out or (args.dir.rstrip("/") + "-bench"), [args.dir, args.dense, _recorded_source(args.dir)])


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune in memory, or one block at a time (``--sequential``, or when the model would not fit);
    under torchrun every rank scores its shard of the calibration data and rank 0 writes."""
    from fxprune.checkpoint import transformer_dir
    from fxprune.distributed import init_distributed
    from fxprune.util.publish import Publication

    out_dir = args.out or (args.model.rstrip("/") + "-pruned")
    dist = init_distributed()
    main_rank = dist is None or dist.is_main
    pub = None
    if main_rank:
        pub = getattr(args, "reserved", None) or Publication(out_dir, overwrite=args.overwrite,
                                                             protect=[args.model, args.calib])
    try:
        _log.info("loading %s...", args.model)
        model_path = transformer_dir(args.model) if os.path.isdir(args.model) else args.model
        pruned_before = os.path.isfile(os.path.join(model_path, "fxprune.json"))
        sequential = args.sequential
        if sequential is None and os.path.isdir(model_path) and not pruned_before:
            from fxprune.passes.sequential import needs_sequential

            sequential, why = needs_sequential(model_path, args.device)
            if sequential and main_rank:
                print(f"fxprune: pruning one block at a time (--sequential): {why}")
        if sequential and (not os.path.isdir(model_path) or pruned_before):
            raise BadInputError("--sequential streams a Hugging Face checkpoint: MODEL must be a local HF directory")
        tokenizer = load_tokenizer(model_path)
        if sequential:
            result, write = _prune_sequential(args, model_path, tokenizer, dist)
        else:
            result, write = _prune_in_memory(args, model_path, pruned_before, tokenizer, dist)
        if main_rank:
            print(result.report.table())
            _log.info("writing %s...", out_dir)
            with pub:
                ckpt = write(str(pub.tmp))
                pub.commit()
            print(f"pruned model, model card (README.md), report.md and report.html written to {out_dir}"
                  if ckpt is not None else f"pruned model, report.md and report.html written to {out_dir}")
            if ckpt is not None:
                print(f"load it with ({ckpt.loads_with}):\n  " + ckpt.how_to_load(out_dir).replace("\n", "\n  "))
        if dist is not None:
            dist.barrier()
    finally:
        if dist is not None:
            dist.close()
    return EXIT_OK


def _prune_in_memory(args: argparse.Namespace, model_path: str, pruned_before: bool, tokenizer: Any,
                     dist: Any) -> tuple[Any, Any]:
    import fxprune

    if pruned_before:  # pruned by fxprune before (maybe per-layer widths)
        from fxprune.util.hf import default_example_inputs

        model = fxprune.load(model_path)
        inputs = default_example_inputs(model)
    else:
        model, inputs = load_model(model_path)
    calib = _calibration(args, tokenizer, inputs)
    result = fxprune.prune(
        model, args.ratio, example_inputs=inputs, calib=calib, tokenizer=tokenizer,
        importance=args.importance, allocation=args.allocation, round_to=args.round_to, uniform=args.uniform,
        shots=args.shots,
        n_samples=args.n_samples, seq_len=args.seq_len, device=args.device, seed=args.seed,
        progress=not args.quiet, kinds=_depth_kinds(args), block_importance=args.block_importance,
        distributed=dist,
    )

    def write(tmp: str) -> Any:
        quality = _prune_quality(args, model, result, tokenizer)
        return _write_pruned(result, tmp, args, tokenizer, quality)

    return result, write


def _prune_sequential(args: argparse.Namespace, model_path: str, tokenizer: Any, dist: Any) -> tuple[Any, Any]:
    from fxprune.passes.sequential import prune_sequential, write_sequential_checkpoint
    from fxprune.report import write_report

    if args.shots not in ("auto", 1):
        raise BadInputError("--sequential prunes in one shot: drop --shots (or use --no-sequential)")
    if args.depth or args.depth_only or args.uniform:
        raise BadInputError("--sequential prunes widths only: drop --depth/--depth-only/--uniform "
                            "(or use --no-sequential)")
    calib = _calibration(args, tokenizer, None)
    chosen = {k: v for k, v in (("importance", args.importance), ("allocation", args.allocation)) if v}
    result = prune_sequential(
        model_path, args.ratio, calib=calib, tokenizer=tokenizer, **chosen, round_to=args.round_to,
        n_samples=args.n_samples, seq_len=args.seq_len, device=args.device, seed=args.seed, distributed=dist,
        offload_dir=args.offload_dir, progress=not args.quiet,
    )
    if not args.quiet and (dist is None or dist.is_main):
        blocks = [t for t in result.run.timings if t.block.startswith(tuple(result.cut.blocks))]
        per = sum(t.total_s for t in blocks) / max(len(blocks), 1)
        peak = result.run.activation_bytes
        print(f"sequential: {len(result.cut.blocks)} blocks, {per:.1f} s per block pass, saved activations "
              f"{peak['activations_ram_peak_bytes'] / 2**20:.0f} MiB in RAM, "
              f"{peak['activations_disk_peak_bytes'] / 2**20:.0f} MiB on disk")

    def write(tmp: str) -> None:
        report = result.report
        ckpt = write_sequential_checkpoint(result, tmp, progress=not args.quiet, tokenizer=tokenizer)
        with open(os.path.join(tmp, "prune_report.json"), "w") as f:
            json.dump(report.to_dict(timings=False), f, indent=1, default=str)
        write_report(tmp, f"fxprune: {os.path.basename(args.model.rstrip('/'))} pruned by {args.ratio:.0%}",
                     report.headline(), prune_report=report, sections={"Details": report.table(timings=False)})
        return ckpt

    return result, write


def _round_to_arg(value: str) -> Any:
    """``--round-to``: a positive int or ``auto`` (the device's multiple)."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None
    return n  # the range is checked with the other prune arguments (one message for CLI and Python)


def _prune_quality(args: argparse.Namespace, dense: Any, result: Any, tokenizer: Any) -> dict | None:
    """Perplexity (LMs) or embedding similarity (encoders) on a few calibration windows, for the card."""
    if not args.calib or tokenizer is None or result.report.returned != "module":
        return None
    from fxprune.calib import load_calibration
    from fxprune.checkpoint import measure_quality

    batches = load_calibration(args.calib, tokenizer=tokenizer, n_samples=min(8, args.n_samples),
                               seq_len=args.seq_len, seed=args.seed + 1, batch_size=1)
    return measure_quality(dense, result.model, batches)


def _write_pruned(result: Any, tmp: str, args: argparse.Namespace, tokenizer: Any, quality: dict | None) -> Any:
    """The checkpoint directory (fxprune.checkpoint) plus the prune report files."""
    from fxprune.checkpoint import write_checkpoint
    from fxprune.report import write_report

    source = args.model if os.path.isdir(args.model) else None
    ckpt = write_checkpoint(result, tmp, source=source, tokenizer=tokenizer, quality=quality,
                            extra={"source": os.path.abspath(args.model), "plan": result.plan.as_dict()})
    with open(os.path.join(tmp, "prune_report.json"), "w") as f:
        json.dump({**result.report.to_dict(timings=False), "loads_with": ckpt.loads_with, "quality": quality}, f,
                  indent=1, default=str)  # byte-identical reruns
    write_report(tmp, f"fxprune: {os.path.basename(args.model.rstrip('/'))} pruned by {args.ratio:.0%}",
                 result.report.headline(), prune_report=result.report,
                 sections={"Details": result.report.table(timings=False),
                           "How to load": ckpt.how_to_load("path/to/this/directory")})
    return ckpt


def _depth_kinds(args: argparse.Namespace) -> dict[str, bool] | None:
    """``--depth``: residual branches join the width groups under one budget; ``--depth-only``:
    branches alone (the width kinds off)."""
    if args.depth_only:
        return {"blocks": True, "channels": False, "heads": False, "kv_heads": False}
    return {"blocks": True} if args.depth else None


def cmd_eval(args: argparse.Namespace) -> int:
    from fxprune.calib import load_calibration
    from fxprune.evaluate import embedding_similarity, is_causal_lm, perplexity

    model = load_any(args.dir)
    tokenizer = load_tokenizer(args.dir)
    if tokenizer is None:
        raise DataError(f"{args.dir} has no tokenizer files that load")
    batches = load_calibration(args.data, tokenizer=tokenizer, n_samples=args.n_samples, seq_len=args.seq_len,
                               seed=args.seed, batch_size=args.batch_size)
    if is_causal_lm(model):
        print(f"perplexity: {perplexity(model, batches):.3f}")
        return EXIT_OK
    ref_path = args.reference or _recorded_source(args.dir)
    if ref_path is None:
        raise BadInputError("encoders are evaluated against a reference model: pass --reference DIR")
    print(f"embedding cosine similarity to {ref_path}: {embedding_similarity(model, load_any(ref_path), batches):.4f}")
    return EXIT_OK


def _save_dir(model: Any, out_dir: str, overwrite: bool, tokenizer: Any, extra: dict, title: str,
              headline: list, sections: dict, protect: tuple = (), reserved: Any = None) -> None:
    from fxprune.checkpoint import write_checkpoint
    from fxprune.report import write_report
    from fxprune.util.publish import Publication

    pub = reserved or Publication(out_dir, overwrite=overwrite, protect=[p for p in protect if p])
    with pub:
        tmp = pub.tmp
        if model is not None:
            write_checkpoint(model, str(tmp), tokenizer=tokenizer, extra=extra)
        elif tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_report(str(tmp), title, headline, sections=sections)
        pub.commit()


def cmd_recover(args: argparse.Namespace) -> int:
    from fxprune.passes.recovery import recover

    from fxprune.util.publish import check_destination

    out_dir = args.out or (args.dir.rstrip("/") + "-recovered")
    protect = (args.dir, args.data, args.teacher)
    check_destination(out_dir, overwrite=args.overwrite, protect=[p for p in protect if p and os.path.exists(p)])
    _log.info("loading %s...", args.dir)
    args.method = _recover_method(args.dir, args.method)
    model = load_any(args.dir)
    tokenizer = load_tokenizer(args.dir)
    teacher = None
    if "distill" in args.method:
        source = args.teacher or _recorded_source(args.dir)
        if source is None:
            raise BadInputError("--method distill needs the dense model: pass --teacher DIR")
        teacher = load_any(source)
    _log.info("recovery...")
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
              f"fxprune recover ({args.method}, {rec.steps} steps)", headline, {}, protect=protect,
              reserved=getattr(args, "reserved", None))
    print(f"recovered model and report written to {out_dir}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from fxprune.passes.capture import default_example_inputs
    from fxprune.passes.export import export_onnx

    _log.info("loading %s...", args.dir)
    model = load_any(args.dir)
    config = getattr(model, "config", None)
    inputs = default_example_inputs(model) if config is not None else None
    if inputs is None:
        raise BadInputError("export needs a model with a config (HF) to build example inputs")
    inputs = {k: v[:, :8] if v.dim() == 2 else v for k, v in inputs.items()}
    _log.info("export...")
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
        raise BadInputError("bench compares with the dense model: pass --dense DIR")
    out_dir = args.out or os.path.join(args.dir.rstrip("/") + "-bench")
    _check_out(out_dir, args.overwrite, [args.dir, dense_dir], "output directory")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in (("dense", dense_dir), ("pruned", args.dir)):
            _log.info("bench %s...", label)
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
    _save_dir(None, out_dir, args.overwrite, None, {}, "fxprune bench: ONNX Runtime latency", headline, {},
              protect=(args.dir, dense_dir), reserved=getattr(args, "reserved", None))
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
        epilog=f"Data files (prune --calib, eval --data, recover --data): {DATA_FILES}. Exit codes: 0 ok, "
               "2 bad input, 3 the model could not be traced, 1 other errors, 130 interrupted (SIGINT/SIGTERM: "
               "nothing is written, no temporary files are left).",
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
    p.add_argument("--overwrite", action="store_true", help="replace existing --graphml/--json files (never an input)")
    p.add_argument("--coverage", action="store_true",
                   help="also list each op that froze something: the spaces, the parameters they hold, "
                        "the source line (sorted by parameters)")
    p.set_defaults(func=cmd_analyze, check=check_analyze)

    p = sub.add_parser("explain", help="why a parameter is frozen, or why two parameters are coupled")
    p.add_argument("model", help="local HF model directory, or module:factory returning (model, kwargs)")
    p.add_argument("target", help="a group id, a parameter name, or NAME:DIM")
    p.add_argument("other", nargs="?", help="a second group/parameter: explain why the two are coupled")
    p.add_argument("--meta", action="store_true", help="build from config on the meta device (no weights)")
    p.add_argument("--ignore", nargs="*", help="parameter or module name prefixes to keep unchanged")
    p.set_defaults(func=cmd_explain, check=check_explain)

    p = sub.add_parser("prune", help="score, plan and remove a fraction of the parameters")
    p.add_argument("model", help="local HF model directory, or module:factory returning (model, kwargs)")
    p.add_argument("--ratio", type=float, required=True, help="fraction of all parameters to remove, in [0, 1)")
    p.add_argument("--importance", default=None,
                   help="surgeon, obs, taylor, taylor-element, taylor-2, l1, l2, activation, flap, random "
                        "(default: fxprune.api.DEFAULT_IMPORTANCE with --calib, l2 without)")
    p.add_argument("--calib", help=f"calibration data (needs tokenizer files in MODEL): {DATA_FILES}")
    p.add_argument("--allocation", default=None, choices=["uniform", "global", "cost"],
                   help="default: cost (removal cost per parameter, every width kind; per-layer widths) for "
                        "surgeon/obs, else uniform (one width per kind: a standard config)")
    p.add_argument("--shots", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="prune in N steps of a linear schedule, re-gathering statistics each shot "
                        "(default auto: one shot per 20%% removed for surgeon/obs, else 1)")
    p.add_argument("--round-to", type=_round_to_arg, default="auto",
                   help="keep pruned sizes a multiple of N units (channels; heads count whole heads); "
                        "auto (default): widths a multiple of 8 elements on CPU, 64 on CUDA")
    p.add_argument("--uniform", action="store_true",
                   help="round the plan to one width per kind, so a standard config describes it "
                        "(for vLLM, TGI, llama.cpp converters; implied by --allocation uniform)")
    p.add_argument("--depth", action="store_true",
                   help="also remove whole residual branches (attention/MLP blocks) under the same budget")
    p.add_argument("--depth-only", action="store_true", help="remove residual branches only (no width pruning)")
    p.add_argument("--block-importance", default="shortgpt",
                   help="criterion for branches: shortgpt, sleb, ppl, taylor+, curvature, random (default shortgpt)")
    p.add_argument("--n-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=128, help="calibration window length (default 128)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output directory (default MODEL-pruned); refused if it exists, or if it is, "
                   "contains or lies inside an input")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory (never an input, nor one holding an input)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="one block at a time from the checkpoint (default: only when in-memory pruning would "
                        "not fit in RAM/GPU memory)")
    p.add_argument("--offload-dir", help="where sequential mode spills block activations that do not fit in RAM")
    p.set_defaults(func=cmd_prune, check=check_prune)

    p = sub.add_parser("eval", help="perplexity (causal LMs) or embedding similarity (encoders)")
    p.add_argument("dir", help="model directory (pruned by fxprune or a plain HF checkpoint)")
    p.add_argument("--data", required=True, help=f"evaluation data: {DATA_FILES}")
    p.add_argument("--reference", help="dense model directory for encoder similarity (default: the pruned model's source)")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=cmd_eval, check=check_eval)

    p = sub.add_parser("recover", help="LoRA fine-tuning or distillation of a pruned model, merged")
    p.add_argument("dir", help="pruned model directory")
    p.add_argument("--data", required=True, help=f"training data: {DATA_FILES} (or Alpaca instruction/input/"
                   "output fields)")
    p.add_argument("--method", default="auto", choices=["auto", "lora", "distill", "lora+distill"],
                   help="auto (default): lora for causal LMs, distill (teacher: the dense source) for encoders")
    p.add_argument("--teacher", help="dense model directory for distillation (default: the recorded source)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output directory (default DIR-recovered)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_recover, check=check_recover)

    p = sub.add_parser("export", help="export to ONNX with dynamic batch/seq and an ORT parity check")
    p.add_argument("dir", help="model directory")
    p.add_argument("--onnx", required=True, help="output .onnx path (refused if it exists)")
    p.add_argument("--kv-cache", action="store_true", help="decoder with past/present key values")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file (never an input)")
    p.set_defaults(func=cmd_export, check=check_export)

    p = sub.add_parser("bench", help="ONNX Runtime latency of a pruned model against its dense source")
    p.add_argument("dir", help="pruned model directory")
    p.add_argument("--dense", help="dense model directory (default: the recorded source)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", help="report directory (default DIR-bench)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report (never an input)")
    p.set_defaults(func=cmd_bench, check=check_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, check every argument and path, run; one line per error, 130 when interrupted."""
    from fxprune.util.interrupts import handle_signals

    parser = build_parser()
    args = parser.parse_args(argv)
    args.reserved = None
    _show_steps(not getattr(args, "quiet", False))
    try:
        with handle_signals(), warnings.catch_warnings(), contextlib.ExitStack() as stack:
            if not args.debug:
                warnings.simplefilter("ignore")
            args.check(args)
            if args.reserved is not None:  # lock the output and make its temporary directory now
                stack.enter_context(args.reserved)
            return args.func(args)
    except KeyboardInterrupt as exc:  # Interrupted (SIGINT/SIGTERM) or a plain KeyboardInterrupt
        if args.debug:
            raise
        what = str(exc) or "interrupted by SIGINT"
        print(f"fxprune: {what}; stopped, nothing was written", file=sys.stderr)
        if argv is None:  # the program itself (not a caller's main([...])): stop now
            _exit_at_once(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one message unless --debug
        if args.debug:
            raise
        code, msg = _exit_code(exc), _message(exc)
    print(f"fxprune: error: {msg}", file=sys.stderr)
    return code


def _exit_at_once(code: int) -> None:
    """Leave without the interpreter's teardown.  Every ``finally`` has run by now (temporary
    directories removed, locks released, nothing published); what is left is the final garbage
    collection of the loaded model, traced programs and their caches, measured at 9 s after an
    interrupt during scoring of a tiny Llama -- longer than a user waits after Ctrl-C."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _show_steps(on: bool) -> None:
    """Print each step's start to stderr (``fxprune: capture...``), unless --quiet."""
    import logging

    _log.setLevel(logging.INFO if on else logging.WARNING)
    if not any(getattr(h, "_fxprune_cli", False) for h in _log.handlers):
        handler = logging.StreamHandler()  # stderr, resolved at each write (pytest's capsys works)
        handler.setFormatter(logging.Formatter("fxprune: %(message)s"))
        handler._fxprune_cli = True  # type: ignore[attr-defined]
        _log.addHandler(handler)
        _log.propagate = False


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, FxpruneError):
        return exc.exit_code
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, ValueError)):
        return EXIT_BAD_INPUT
    return EXIT_ERROR


def _message(exc: BaseException) -> str:
    if isinstance(exc, CaptureError):  # the reason and the user's line, then what to try
        return str(exc).strip()
    text = str(exc).strip()
    if isinstance(exc, FxpruneError):
        return text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or text}"
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
