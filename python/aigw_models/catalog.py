"""Which models exist under MODEL_PATH, and loading one.

A model is a folder under MODEL_PATH holding ``config.json`` (a Hugging Face
layout); its *name* is the folder name, and it is served as the bus service
``model.<name>`` (clients say ``local/<name>``). Built-in names:

* ``hash-embed`` — the hashing embedder (``aigw_models.embed``), no files.
* ``tiny`` — an alias of the folder ``tiny-llama`` written by make_tiny.

Names must be valid service-name characters (letters, digits, ``._-:``);
folders with other names are listed as ``invalid``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .embed import DEFAULT_DIM, HashEmbedder
from .engine import Engine
from .tokenizers import Tokenizer, chat_template_of, load_tokenizer
from .transformer import ModelConfig, ModelError, Transformer, read_config
from .safetensors import open_model_weights

ALIASES = {"tiny": "tiny-llama"}
BUILTIN = ("hash-embed",)
_NAME_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,100}$")


def valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and name not in (".", "..") and ".." not in name


def model_dir(root: str, name: str) -> str:
    """The folder of a model name (aliases resolved); ValueError if invalid."""
    if not valid_name(name):
        raise ValueError(f"invalid model name {name!r}")
    return os.path.join(root, ALIASES.get(name, name))


def discover(root: str) -> List[Dict[str, Any]]:
    """Models available under root: [{name, path, arch, size_bytes, ...}]."""
    out: List[Dict[str, Any]] = [{"name": "hash-embed", "kind": "embedding",
                                  "arch": "hash", "builtin": True}]
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        entries = []
    aliases_back = {v: k for k, v in ALIASES.items()}
    for entry in entries:
        path = os.path.join(root, entry)
        if entry.endswith(".tmp") or entry.startswith(".") or not os.path.isdir(path):
            continue
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            continue
        item: Dict[str, Any] = {"name": aliases_back.get(entry, entry), "folder": entry,
                                "kind": "generation"}
        try:
            cfg = read_config(path)
            item.update(arch=cfg.arch, layers=cfg.layers, hidden=cfg.hidden,
                        vocab_size=cfg.vocab_size, context=cfg.max_positions)
        except ModelError as exc:
            item.update(arch="unsupported", error=str(exc))
        size = 0
        for f in os.listdir(path):
            try:
                size += os.path.getsize(os.path.join(path, f))
            except OSError:
                pass
        item["size_bytes"] = size
        if not valid_name(entry):
            item["error"] = "invalid folder name for a model"
        out.append(item)
    return out


@dataclass
class TextModel:
    """A loaded generative model with its tokenizer and batching engine."""

    name: str
    path: str
    model: Transformer
    tokenizer: Tokenizer
    chat_template: Optional[str]
    engine: Engine
    settings: Dict[str, Any] = field(default_factory=dict)
    kind: str = "generation"

    @property
    def context(self) -> int:
        return self.model.max_positions


@dataclass
class HashModel:
    """The built-in hashing embedder."""

    name: str
    embedder: HashEmbedder
    settings: Dict[str, Any] = field(default_factory=dict)
    kind: str = "embedding"


def load(root: str, name: str, slots: int = 4,
         progress: Optional[Callable[[float, str], None]] = None) -> Any:
    """Load a model by name (a TextModel or HashModel). Raises ModelError
    (or ValueError / OSError) with a message fit for a user."""
    report = progress or (lambda fraction, what: None)
    if name == "hash-embed":
        return HashModel(name, HashEmbedder(DEFAULT_DIM), {"dimensions": DEFAULT_DIM})
    path = model_dir(root, name)
    if not os.path.isdir(path):
        raise ModelError(f"model {name!r} not found under {root}")
    report(0.0, "config")
    config = read_config(path)
    report(0.05, "tokenizer")
    tokenizer = load_tokenizer(path)
    weights = open_model_weights(path)
    report(0.1, "weights")
    model = Transformer(config, weights,
                        progress=lambda done, total: report(0.1 + 0.85 * done / total,
                                                            "weights"))
    stop_ids: List[int] = []
    gen_cfg = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_cfg):
        try:
            with open(gen_cfg, encoding="utf-8") as fh:
                eos = json.load(fh).get("eos_token_id")
            stop_ids = [int(e) for e in eos] if isinstance(eos, list) else (
                [int(eos)] if isinstance(eos, int) else [])
        except (OSError, ValueError, AttributeError):
            pass
    engine = Engine(model, tokenizer, slots, stop_ids)
    report(1.0, "ready")
    return TextModel(name, path, model, tokenizer, chat_template_of(path), engine)


__all__ = ["ALIASES", "BUILTIN", "HashModel", "ModelConfig", "TextModel", "discover", "load",
           "model_dir", "valid_name"]
