"""A pruned checkpoint directory that the user's own stack loads as it is.

:func:`write_checkpoint` is what ``fxprune.save`` and ``fxprune prune`` write:

* the model (``model.safetensors`` + ``fxprune.json``, by :func:`fxprune.io.save_into`);
* ``config.json``, in one of two forms, decided by rebuilding the class from the config on the
  meta device and comparing shapes and attributes with the pruned model:

  - **standard** (``loads_with == "transformers"``): the config describes the model (every
    layer of a kind has the same width, as ``allocation="uniform"`` makes it), so plain
    ``AutoModel*.from_pretrained``, ``pipeline`` and ``SentenceTransformer`` load it;
  - **per-layer** (``"trust_remote_code"``): layers differ in width (``allocation="global"``,
    kept blocks...).  The config keeps the dense fields plus an ``"fxprune"`` entry with every
    shape, int attribute and per-module config field that differs, and ``modeling_fxprune.py``
    is written next to it: a subclass of the original class that builds as usual and then
    resizes its layers from that entry.  ``auto_map`` points the Auto classes at it and the
    ``model_type`` becomes ``fxpruned_<type>``, so loading without ``trust_remote_code=True``
    fails with transformers' clear "contains custom code" message instead of a size mismatch.
    The file needs only torch and transformers, and works offline.
  - ``"fxprune"``: not an HF model (or a buffer the class cannot rebuild): ``fxprune.load``.

* everything else the source checkpoint holds, copied: tokenizer files,
  ``generation_config.json``, sentence-transformers files (``modules.json``,
  ``config_sentence_transformers.json``, ``sentence_bert_config.json``, ``1_Pooling/`` and any
  other module directory); not the dense weights, exported copies (``onnx/``), VCS or caches;
* ``README.md``, a model card: what was pruned, how, with what measured quality, and how to load.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import shutil
from typing import Any, Callable, Mapping

import torch

from fxprune import io
from fxprune.util import hf

__all__ = ["Checkpoint", "LOADS_WITH", "copy_source_files", "transformer_dir", "write_checkpoint"]

LOADS_WITH = ("transformers", "trust_remote_code", "fxprune")
MODELING_FILE = "modeling_fxprune.py"

# Files of the source's model directory that the pruned checkpoint replaces or must not carry.
_NOT_COPIED = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.ot", "*.gguf", "*.onnx",
    "*.onnx_data", "*.index.json", "config.json", "README.md", "fxprune.json", MODELING_FILE, "prune_report.json",
    "report.md", "report.html", "*.png", "*.lock", ".*",
)
_NOT_COPIED_DIRS = ("onnx", "openvino", "coreml", "tflite", "__pycache__", "runs", "checkpoint-*", ".*")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                    "spiece.model", "tokenizer.model", "special_tokens_map.json", "sentencepiece.bpe.model")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What :func:`write_checkpoint` wrote and how to load it."""

    loads_with: str  # one of LOADS_WITH
    copied: tuple[str, ...]  # paths (relative) carried over from the source
    auto_classes: tuple[str, ...]  # Auto classes auto_map points at the modeling file
    sentence_transformers: bool
    notes: tuple[str, ...] = ()

    def how_to_load(self, path: str = "OUT") -> str:
        """Python lines that load the directory, for the CLI and the model card."""
        remote = ", trust_remote_code=True" if self.loads_with == "trust_remote_code" else ""
        if self.loads_with == "fxprune":
            return f'import fxprune\nmodel = fxprune.load("{path}")'
        auto = next((a for a in self.auto_classes if a != "AutoModel"), "AutoModel") if self.auto_classes else "AutoModel"
        lines = [f"from transformers import {auto}", f'model = {auto}.from_pretrained("{path}"{remote})']
        if remote and os.path.isfile(os.path.join(path, "tokenizer_config.json")):  # AutoTokenizer reads the config
            lines[0] = f"from transformers import {auto}, AutoTokenizer"
            lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{path}"{remote})')
        if auto == "AutoModelForCausalLM":
            lines += ["from transformers import pipeline",
                      f'generate = pipeline("text-generation", model="{path}"{remote})']
        if self.sentence_transformers:
            lines += ["from sentence_transformers import SentenceTransformer",
                      f'encoder = SentenceTransformer("{path}"{remote})']
        lines += ["# or: import fxprune; model = fxprune.load(\"" + path + "\")"]
        return "\n".join(lines)


def transformer_dir(path: str) -> str:
    """The directory holding the transformer of a checkpoint: ``path`` itself, or the
    sentence-transformers module directory (``0_Transformer/`` in older layouts)."""
    modules = os.path.join(path, "modules.json")
    if os.path.isfile(modules) and not os.path.isfile(os.path.join(path, "config.json")):
        with open(modules) as f:
            for m in json.load(f):
                if str(m.get("type", "")).endswith("models.Transformer") and m.get("path"):
                    return os.path.join(path, m["path"])
    return path


def copy_source_files(source: str, dest: str) -> list[str]:
    """Copy everything but the model itself from ``source`` into ``dest``; returns relative paths.

    In the transformer's own directory (``source``, or ``0_Transformer/`` of an older
    sentence-transformers layout) weights, ``config.json`` and ``README.md`` are skipped (the
    pruned ones replace them); other module directories (``1_Pooling/``, ``2_Dense/`` with its
    own weights) are copied whole.
    """
    model_dir = os.path.relpath(transformer_dir(source), source)
    copied: list[str] = []
    for root, dirs, files in os.walk(source):
        rel_root = os.path.relpath(root, source)
        dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, p) for p in _NOT_COPIED_DIRS))
        is_model_dir = rel_root == model_dir
        for name in sorted(files):
            if name.startswith(".") or (is_model_dir and any(fnmatch.fnmatch(name, p) for p in _NOT_COPIED)):
                continue
            if rel_root == "." and name == "README.md":  # the model card replaces it
                continue
            rel = os.path.normpath(os.path.join(rel_root, name))
            target = os.path.join(dest, rel)
            if os.path.exists(target):  # written by the pruned model itself
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(root, name), target)
            copied.append(rel)
    return copied


def write_checkpoint(model_or_result: Any, tmp: str, *, source: str | None = None, tokenizer: Any = None,
                     quality: Mapping[str, Any] | None = None, extra: dict | None = None,
                     save_weights: Callable[[str, dict], io.SavedModel] | None = None) -> Checkpoint:
    """Write a complete checkpoint directory into ``tmp`` (an unpublished temporary directory).

    ``model_or_result`` is a ``PruneResult`` (best: the model card then says what was pruned),
    a ``RewriteResult`` or a module.  ``source``: the checkpoint the model was loaded from, whose
    other files are carried over.  ``tokenizer`` is saved when the source has no tokenizer
    files.  ``quality``: measured numbers for the model card (see :func:`measure_quality`).
    ``save_weights(dir, extra)`` writes the weights and ``fxprune.json`` instead of
    :func:`fxprune.io.save_into` (sequential mode streams them shard by shard).
    """
    model, _ = io._unpack(model_or_result)
    report = getattr(model_or_result, "report", None)
    model_dir = tmp
    if source and os.path.abspath(transformer_dir(source)) != os.path.abspath(source):
        model_dir = os.path.join(tmp, os.path.relpath(transformer_dir(source), source))
        os.makedirs(model_dir, exist_ok=True)
    extra = {**(extra or {}), **({"source": os.path.abspath(source)} if source else {})}
    saved = (save_weights or (lambda d, e: io.save_into(model_or_result, d, extra=e)))(model_dir, extra)
    loads_with, autos, notes = _write_config(model, saved, model_dir)
    copied = copy_source_files(source, tmp) if source else []
    if tokenizer is not None and not any(os.path.basename(c) in _TOKENIZER_FILES for c in copied):
        tokenizer.save_pretrained(model_dir)
    _ensure_tokenizer_class(model_dir, tokenizer)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hf.is_causal_lm(model) and not os.path.exists(os.path.join(model_dir, "generation_config.json")):
        gen.save_pretrained(model_dir)
    st = os.path.isfile(os.path.join(tmp, "modules.json"))
    if st:
        notes += _update_sentence_transformers(tmp, model)
    _amend_record(model_dir, {"loads_with": loads_with, "copied": copied})
    ckpt = Checkpoint(loads_with, tuple(copied), tuple(autos), st, tuple(notes))
    from fxprune.report import model_card

    card = model_card(model, ckpt, report=report, source=source, quality=quality,
                      plan_info=getattr(getattr(model_or_result, "plan", None), "info", None))
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(card)
    return ckpt


def measure_quality(dense: torch.nn.Module, pruned: torch.nn.Module, batches: list) -> dict[str, Any]:
    """Quality of ``pruned`` next to ``dense`` on ``batches``: perplexity for causal LMs, mean
    cosine similarity of mean-pooled sentence embeddings for encoders (what the card reports)."""
    from fxprune.evaluate import embedding_similarity, perplexity

    if not batches:
        return {}
    tokens = int(sum(int(b["input_ids"].numel()) for b in batches if "input_ids" in b))
    if hf.is_causal_lm(pruned):
        return {"metric": "perplexity", "dense": perplexity(dense, batches), "pruned": perplexity(pruned, batches),
                "batches": len(batches), "tokens": tokens}
    if all("input_ids" in b for b in batches):
        return {"metric": "embedding cosine similarity to the dense model",
                "pruned": embedding_similarity(pruned, dense, batches), "batches": len(batches), "tokens": tokens}
    return {}


# ------------------------------------------------------------------------------------------
# config.json: standard, or per-layer with a modeling file
# ------------------------------------------------------------------------------------------
def _write_config(model: torch.nn.Module, saved: io.SavedModel, out: str) -> tuple[str, list[str], list[str]]:
    config = hf.config_of(model)
    if config is None:
        return "fxprune", [], []
    if saved.standard:
        config.save_pretrained(out)
        autos = [a for a, cls, _ in _auto_classes(model) if a and cls is type(model)]
        return "transformers", autos, []
    from_transformers = type(model).__module__.startswith("transformers.")
    if not from_transformers or saved.extra_buffers or saved.depth_code:
        config.save_pretrained(out)
        why = (f"buffers {list(saved.extra_buffers)[:3]} cannot be rebuilt by {type(model).__name__}"
               if saved.extra_buffers else
               "removed residual branches (depth pruning) that its config does not describe" if saved.depth_code
               else f"{type(model).__name__} is not a transformers class")
        return "fxprune", [], [f"the checkpoint loads with fxprune.load only: {why}"]
    classes = _auto_classes(model)
    source = modeling_source(model, classes)
    with open(os.path.join(out, MODELING_FILE), "w") as f:
        f.write(source)
    values = config.to_dict()
    model_type = values.get("model_type") or getattr(config, "model_type", "model")
    names = _class_names(model, classes)
    values.update({
        "model_type": f"fxpruned_{model_type}",
        "architectures": [names[type(model)]],
        "auto_map": {"AutoConfig": f"modeling_fxprune.{_config_name(config)}",
                     **{auto: f"modeling_fxprune.{names[cls]}" for auto, cls, _ in classes if auto}},
        "fxprune": {
            "version": 1,
            "original_model_type": model_type,
            "shapes": saved.changed_shapes,
            "attributes": saved.record.get("attributes", {}),
            "module_configs": {p: v for p, v in saved.record.get("module_configs", {}).items() if v},
        },
    })
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(values, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    return "trust_remote_code", [a for a, _, _ in classes if a], []


def _auto_classes(model: torch.nn.Module) -> list[tuple[str, type, str]]:
    """(Auto class name, class, state-dict prefix) for every transformers Auto class that maps
    this config type to the model's class, plus ``AutoModel`` for its base model."""
    import transformers

    model_type = getattr(hf.config_of(model), "model_type", None)
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    base = base if isinstance(base, torch.nn.Module) and base is not model else None
    out: list[tuple[str, type, str]] = []
    for name in _auto_model_names():
        try:
            names = getattr(getattr(getattr(transformers, name), "_model_mapping", None), "_model_mapping", None)
        except Exception:  # noqa: BLE001 - an Auto class whose backend is missing
            continue
        if not isinstance(names, Mapping) or model_type not in names:
            continue
        mapped = names[model_type]
        mapped = set(mapped) if isinstance(mapped, (list, tuple)) else {mapped}
        if type(model).__name__ in mapped:
            out.append((name, type(model), ""))
        elif base is not None and name == "AutoModel" and type(base).__name__ in mapped:
            out.append((name, type(base), prefix + "."))
    if not any(cls is type(model) for _, cls, _ in out):
        out.append(("", type(model), ""))  # no Auto class: importable from the file by name
    return out


@functools.lru_cache(maxsize=1)
def _auto_model_names() -> tuple[str, ...]:
    import transformers

    return tuple(sorted(n for n in dir(transformers) if n.startswith("AutoModel")))


def _config_name(config: Any) -> str:
    return f"Fxpruned{type(config).__name__}"


def _class_names(model: torch.nn.Module, classes: list[tuple[str, type, str]]) -> dict[type, str]:
    return {cls: f"Fxpruned{cls.__name__}" for _, cls, _ in classes}


def modeling_source(model: torch.nn.Module, classes: list[tuple[str, type, str]] | None = None) -> str:
    """The text of ``modeling_fxprune.py`` for ``model``'s class (see the module docstring)."""
    classes = classes if classes is not None else _auto_classes(model)
    config = hf.config_of(model)
    names = _class_names(model, classes)
    seen: dict[type, str] = {}
    for _, cls, prefix in classes:
        seen.setdefault(cls, prefix)
    imports = [f"from {type(config).__module__} import {type(config).__name__} as _Config"]
    defs = []
    for i, (cls, prefix) in enumerate(seen.items()):
        imports.append(f"from {cls.__module__} import {cls.__name__} as _Base{i}")
        defs.append(_CLASS_TEMPLATE.format(name=names[cls], base=f"_Base{i}", original=cls.__name__,
                                           prefix=prefix, config=_config_name(config)))
    model_type = getattr(config, "model_type", "model")
    return _MODULE_TEMPLATE.format(
        original=type(model).__name__, imports="\n".join(imports), config=_config_name(config),
        model_type=f"fxpruned_{model_type}", classes="\n\n".join(defs),
    )


_MODULE_TEMPLATE = '''"""{original} pruned by fxprune, with layers of different widths.

Load with plain transformers (works offline, needs torch and transformers only):

    AutoModel*.from_pretrained(this_directory, trust_remote_code=True)

Each class below is the original class: it builds as usual from config.json, then resizes its
layers to the shapes recorded in config.json's "fxprune" entry (and sets the int attributes and
per-module config fields recorded there), before transformers loads the weights into it.
Written by fxprune; ``fxprune.load(this_directory)`` loads the same model.
"""

import copy

import torch

{imports}


class {config}(_Config):
    model_type = "{model_type}"


def _refresh(module):
    """Size attributes of standard layers follow their new weights."""
    w = getattr(module, "weight", None)
    if w is None:
        return
    if isinstance(module, torch.nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, torch.nn.Embedding):
        module.num_embeddings, module.embedding_dim = w.shape
    elif isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        module.normalized_shape = tuple(w.shape)
    elif isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
        module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, torch.nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, torch.nn.modules.batchnorm._NormBase):
        module.num_features = w.shape[0]
    elif isinstance(module, torch.nn.GroupNorm):
        module.num_channels = w.shape[0]
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        module.nf = w.shape[1]


def _local(name, prefix):
    if not prefix:
        return name
    if name == prefix[:-1]:
        return ""
    return name[len(prefix):] if name.startswith(prefix) else None


def resize(model, config, prefix=""):
    """Resize ``model`` to the pruned shapes in ``config.fxprune`` (names under ``prefix``)."""
    spec = getattr(config, "fxprune", None) or {{}}
    touched = set()
    for name, shape in spec.get("shapes", {{}}).items():
        name = _local(name, prefix)
        if name is None:
            continue
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        old = getattr(module, attr)
        if old is None and module._parameters.get(attr, False) is None:  # a bias an update added
            like = next(iter(module.parameters(recurse=False)))
            module._parameters[attr] = torch.nn.Parameter(torch.empty(tuple(shape), dtype=like.dtype,
                                                                      device=like.device))
            continue
        if tuple(old.shape) == tuple(shape):
            continue
        new = torch.empty(tuple(shape), dtype=old.dtype, device=old.device)
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = new
        touched.add(path)
    for path in touched:
        _refresh(model.get_submodule(path))
    for path, attrs in spec.get("attributes", {{}}).items():
        path = _local(path, prefix)
        if path is not None:
            for attr, value in attrs.items():
                setattr(model.get_submodule(path), attr, value)
    for path, fields in spec.get("module_configs", {{}}).items():
        path = _local(path, prefix)
        if path is not None:
            own = copy.deepcopy(config)
            for key, value in fields.items():
                setattr(own, key, value)
            model.get_submodule(path).config = own


{classes}
'''

_CLASS_TEMPLATE = '''class {name}({base}):
    """{original} with the per-layer widths recorded in config.json."""

    config_class = {config}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        resize(self, config, "{prefix}")'''


def _ensure_tokenizer_class(model_dir: str, tokenizer: Any) -> None:
    """A per-layer checkpoint has a custom model_type, so AutoTokenizer must not need it."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    if tokenizer is None or not os.path.isfile(path):
        return
    with open(path) as f:
        values = json.load(f)
    if not values.get("tokenizer_class"):
        values["tokenizer_class"] = type(tokenizer).__name__
        with open(path, "w") as f:
            json.dump(values, f, indent=2)


def _update_sentence_transformers(out: str, model: torch.nn.Module) -> list[str]:
    """Keep the pooling width in step with the model's hidden size (pruned only with kinds=hidden)."""
    hidden = getattr(hf.config_of(model), "hidden_size", None)
    notes = []
    for root, _, files in os.walk(out):
        if "config.json" in files and os.path.basename(root).endswith("Pooling"):
            path = os.path.join(root, "config.json")
            with open(path) as f:
                values = json.load(f)
            emb = _embedding_width(model)
            if emb and values.get("word_embedding_dimension") not in (None, emb):
                values["word_embedding_dimension"] = emb
                with open(path, "w") as f:
                    json.dump(values, f, indent=2)
                notes.append(f"{os.path.relpath(path, out)}: word_embedding_dimension set to {emb} (hidden {hidden})")
    return notes


def _embedding_width(model: torch.nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return int(emb.weight.shape[1]) if emb is not None and hasattr(emb, "weight") else None


def _amend_record(model_dir: str, values: Mapping[str, Any]) -> None:
    path = os.path.join(model_dir, io.RECORD)
    with open(path) as f:
        record = json.load(f)
    record.update(values)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
