"""Config sizes that build the model (layers, widths, heads, vocabulary, identifiers, edges), bounded before anything
is built.

`from_pretrained` builds the model its config describes and only then reads the weights, so a config.json edited by
hand or from another save decides how much is allocated: `text_config.num_layers = 1e6` ran the loader into a
SystemError after 1.5 GB and 28 s, and a config with more layers than the weights loaded with the extra layers left
random. Three gates, cheapest first:

1. `check_config_values`: every size field is an int, >= 0 and within `SIZE_CAPS` (a config built in code meets the
   same caps, through `GcmrConfig` validation). The caps sit far above any published model: only a typo or damage
   reaches them. Identifier rows and edges are capped at 2**31 - 1 because the trie paths are int32.
2. From a checkpoint folder, the safetensors headers are read (shapes only, no tensor data): no layer count may
   exceed the tensors the weights hold (a layer has at least one), so the next gate's build stays small.
3. `check_against_weights`: the model is built on the meta device (no memory) and every tensor's shape and every
   layer list's length is compared with the headers. A difference names the config field that makes it (found by
   rebuilding with that field at the size the weights hold), its value and what the weights file holds.

A Hub file: it imports only the standard library, torch and safetensors.
"""
from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MAX_LAYERS = 1024
MAX_COUNT = 4096  # heads, visual tokens, identifier length, position buckets
MAX_WIDTH = 2**20  # hidden and feed-forward widths, vocabularies, positions
MAX_ROWS = 2**31 - 1  # identifiers and trie edges: int32 paths
LAYER_FIELDS = ("num_layers", "num_decoder_layers", "num_hidden_layers", "encoder_layers", "decoder_layers",
                "n_layer", "n_layers")
_COUNT_FIELDS = ("num_heads", "num_attention_heads", "num_key_value_heads", "n_head", "fusion_num_heads",
                 "num_visual_tokens", "max_identifier_length", "relative_attention_num_buckets", "num_channels")
_WIDTH_FIELDS = ("vocab_size", "d_model", "hidden_size", "d_ff", "intermediate_size", "d_kv", "head_dim",
                 "projection_dim", "max_position_embeddings", "n_positions", "type_vocab_size", "image_size",
                 "patch_size", "n_embd", "n_inner", "identifier_dim", "image_embed_dim")
SIZE_CAPS = {
    **dict.fromkeys(LAYER_FIELDS, MAX_LAYERS),
    **dict.fromkeys(_COUNT_FIELDS, MAX_COUNT),
    **dict.fromkeys(_WIDTH_FIELDS, MAX_WIDTH),
    "num_identifiers": MAX_ROWS,
    "num_identifier_edges": MAX_ROWS,
}
# The first numbered module of a tensor name: `backbone.encoder.block.3.layer.0.x` -> (`backbone.encoder.block`, 3).
_LAYER_LIST = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.")
# Config sub-trees that build each top-level module (rebuilding with a field of another tree is tried after them).
_SCOPES = {"backbone": "text_config.", "vision_tower": "vision_config."}
_MAX_PROBES = 12
_MIXED = ("config.json and the weights come from different saves (a save interrupted while its files were moved in?) "
          "or config.json was edited. Save the model again, with save_retriever(model, tokenizer, folder) for model "
          "and tokenizer together")


def size_fields(config: Mapping, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted path, field name, value) of every size field in a config dict and its sub-configs, None left out."""
    for name, value in config.items():
        if isinstance(value, Mapping) and (name.endswith("_config") or name in ("encoder", "decoder")):
            yield from size_fields(value, f"{path}{name}.")
        elif name in SIZE_CAPS and value is not None:
            yield f"{path}{name}", name, value


def check_config_values(config: Mapping, source: str, saved: Mapping[str, tuple] | None = None,
                        weights: str = WEIGHTS_NAME) -> None:
    """Raise a ValueError naming the first size field that is not an int in [0, cap] (or, with the weights' `saved`
    shapes, a layer count above the tensors they hold). `source` names the config in the message."""
    held = f"; {weights} holds {_summary(saved)}" if saved else ""
    for path, name, value in size_fields(config):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{source} sets {path} = {value!r}: a size must be an int{held}")
        if not 0 <= value <= SIZE_CAPS[name]:
            raise ValueError(f"{source} sets {path} = {value}: it must be in [0, {SIZE_CAPS[name]}] (the caps in "
                             f"config_sizes_gcmr.py){held}")
        if saved and name in LAYER_FIELDS and value > len(saved):
            raise ValueError(f"{source} sets {path} = {value}, but {weights} holds {len(saved)} tensors in all, too "
                             f"few for {value} layers (each has at least one): {_MIXED}")


def saved_shapes(folder: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]] | None:
    """Shape and file name of every tensor of the model's weights in `folder`, read from the safetensors headers
    alone; None when there are no weights or one cannot be read (the load itself then reports it)."""
    try:
        if os.path.isfile(os.path.join(folder, WEIGHTS_INDEX_NAME)):
            with open(os.path.join(folder, WEIGHTS_INDEX_NAME), encoding="utf-8") as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        elif os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            files = [WEIGHTS_NAME]
        else:
            return None
        shapes, file_of = {}, {}
        for name in files:
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for tensor in handle.keys():
                    shapes[tensor] = tuple(handle.get_slice(tensor).get_shape())
                    file_of[tensor] = name
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError):
        return None
    return shapes, file_of


def check_folder_values(folder: str) -> None:
    """Gates 1 and 2 on the raw config.json of a checkpoint folder, before any config object is made."""
    read = saved_shapes(folder)
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError):
        return  # transformers reports a missing or unreadable config.json
    if isinstance(raw, dict):
        check_config_values(raw, f"config.json in {folder}", read[0] if read else None,
                            _weights_name(read[1]) if read else WEIGHTS_NAME)


def check_against_weights(model_class: type, folder: str, config: Any = None) -> None:
    """All three gates for loading `model_class` from `folder` (with `config`, else its config.json): a ValueError
    names the config field whose size differs from what the weights file holds."""
    read = saved_shapes(folder)
    if read is None:
        return
    saved, file_of = read
    source = f"config.json in {folder}"
    if config is None:
        config = model_class.config_class.from_pretrained(folder)  # runs gates 1 and 2 on the raw file
    else:
        check_config_values(config.to_dict(), source, saved, _weights_name(file_of))
    expected = _meta_shapes(model_class, config)
    difference = _first_difference(expected, saved) if expected is not None else None
    if difference is None:
        return
    kind, where, built, held = difference
    weights = file_of.get(where) or _weights_name(file_of)
    field = _responsible_field(model_class, config, difference, saved)
    if kind == "layers":
        what = f"{built} layers in {where}; {weights} holds {held}"
        advice = ""
    else:
        what = f"{where} as {built}; {weights} holds {held}"
        advice = "; or pass ignore_mismatched_sizes=True to load it with those tensors newly initialised"
    if field is None:
        problem = f"{'layer count' if kind == 'layers' else 'shape'} mismatch: {source} builds {what}"
    else:
        path, value = field
        problem = f"{path} mismatch: {source} sets {path} = {value}, which builds {what}"
    raise ValueError(f"{problem}: {_MIXED}{advice}.")


def _summary(saved: Mapping[str, tuple]) -> str:
    largest = max((max(shape, default=0) for shape in saved.values()), default=0)
    return f"{len(saved)} tensors, the largest dimension {largest}"


def _weights_name(file_of: Mapping[str, str]) -> str:
    names = sorted(set(file_of.values()))
    return names[0] if len(names) == 1 else WEIGHTS_INDEX_NAME


def _meta_shapes(model_class: type, config: Any) -> dict[str, tuple[int, ...]] | None:
    """What `config` builds, on the meta device (no memory); None if it cannot be built (the load then says why)."""
    try:
        with torch.device("meta"):
            model = model_class(copy.deepcopy(config))
        return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    except Exception:  # the diagnosis must never hide the load's own error
        return None


def _layer_counts(names: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        match = _LAYER_LIST.match(name)
        if match:
            counts[match["prefix"]] = max(counts.get(match["prefix"], 0), int(match["index"]) + 1)
    return counts


def _first_difference(expected: Mapping[str, tuple], saved: Mapping[str, tuple]) -> tuple | None:
    """("layers", layer list, built, held) or ("shape", tensor, built, held); layer lists only where both have one
    (a tensor the weights leave out, such as a tied copy, is no difference)."""
    built, held = _layer_counts(expected), _layer_counts(saved)
    for prefix in sorted(built.keys() & held.keys()):
        if built[prefix] != held[prefix]:
            return "layers", prefix, built[prefix], held[prefix]
    for name in sorted(expected.keys() & saved.keys()):
        if expected[name] != saved[name]:
            return "shape", name, expected[name], saved[name]
    return None


def _responsible_field(model_class: type, config: Any, difference: tuple,
                       saved: Mapping[str, tuple]) -> tuple[str, int] | None:
    """The size field that, set to what the weights imply, makes the difference go: (path, value in the config)."""
    kind, where, built, held = difference
    scope = _SCOPES.get(where.split(".")[0])
    preferred = (lambda path: path.startswith(scope)) if scope else (lambda path: "." not in path)
    tries, partial = 0, None
    for path, name, value in sorted(size_fields(config.to_dict()), key=lambda field: not preferred(field[0])):
        candidate = _implied_value(kind, name, value, built, held)
        if candidate is None or tries == _MAX_PROBES:
            continue
        tries += 1
        probe = _with_value(config, path, candidate)
        shapes = _meta_shapes(model_class, probe) if probe is not None else None
        if shapes is None:
            continue
        if _first_difference(shapes, saved) is None:
            return path, value  # this field alone explains every difference
        now = _layer_counts(shapes).get(where) if kind == "layers" else shapes.get(where)
        if now == held and partial is None:
            partial = path, value  # explains this difference; another field differs too
    return partial


def _implied_value(kind: str, name: str, value: int, built: Any, held: Any) -> int | None:
    """The value of field `name` that would build what the weights hold, if it alone scales the difference."""
    if kind == "layers":
        candidate = value + held - built if name in LAYER_FIELDS else None
    elif name in LAYER_FIELDS or len(built) != len(held) or 0 in built:
        candidate = None
    else:
        axis = next(axis for axis, (a, b) in enumerate(zip(built, held)) if a != b)
        candidate = None if (value * held[axis]) % built[axis] else value * held[axis] // built[axis]
    return candidate if candidate is not None and candidate >= 0 and candidate != value else None


def _with_value(config: Any, path: str, value: int) -> Any:
    values = config.to_dict()
    node = values
    *parents, name = path.split(".")
    for parent in parents:
        node = node[parent]
    node[name] = value
    try:
        return type(config).from_dict(values)
    except Exception:  # a value the config itself refuses cannot be the one
        return None


__all__ = ["SIZE_CAPS", "check_against_weights", "check_config_values", "check_folder_values", "saved_shapes",
           "size_fields"]
