"""Finding the modules a PEFT method adapts, by name pattern, and swapping them in place.

Why: PEFT methods replace modules of an already built (or loaded) model rather than building a
different architecture; NNX modules are mutable Python objects, so a replacement is an
attribute assignment on the parent. Replacements are subclasses that keep the replaced
module's own parameters under the same names, so base parameter paths (and with them the
Hugging Face name map, checkpoints and sharding rules) do not change.

A pattern matches a dotted module path such as `backbone.layers.3.attention.query` when it
equals a suffix at a dot boundary (`query`, `attention.query`) or, as a glob, matches the path
or such a suffix (`layers.1.*`, `attention.*`).
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Iterator

from flax import nnx

from models.errors import ConfigError


def dotted(path: Iterable) -> str:
    return ".".join(str(p) for p in path)


def matches(pattern: str, path: str) -> bool:
    return (
        path == pattern
        or path.endswith("." + pattern)
        or fnmatch.fnmatchcase(path, pattern)
        or fnmatch.fnmatchcase(path, "*." + pattern)
    )


def blocks(model) -> nnx.List:
    """The Transformer blocks of a models.Model (BERT layers or GPT-2 blocks)."""
    return model.backbone.layers


def block_path(index: int) -> tuple:
    return ("backbone", "layers", index)


def modules_in_blocks(model, module_type: type) -> Iterator[tuple[int, tuple, nnx.Module]]:
    """(block index, path inside the block, module) for every `module_type` inside a block."""
    for index, block in enumerate(blocks(model)):
        for path, module in block.iter_modules():
            if path and isinstance(module, module_type):
                yield index, tuple(path), module


def select(model, module_type: type, patterns: Iterable[str], key: str) -> list[tuple[int, tuple, nnx.Module]]:
    """The `module_type` modules inside blocks matched by `patterns`; every pattern must match one."""
    candidates = list(modules_in_blocks(model, module_type))
    chosen, used = [], set()
    for index, path, module in candidates:
        full = dotted(block_path(index) + path)
        hits = [p for p in patterns if matches(p, full)]
        if hits:
            chosen.append((index, path, module))
            used.update(hits)
    unused = [p for p in patterns if p not in used]
    if unused:
        names = sorted({dotted(path) for _, path, _ in candidates})
        raise ConfigError(
            f"peft.{key}: pattern {unused[0]!r} matches no {module_type.__name__} layer inside a Transformer block; "
            f"the block's layers are: {', '.join(names)}"
        )
    return chosen


def module_paths(model, patterns: Iterable[str], key: str) -> list[tuple]:
    """Paths of the modules anywhere in the model matched by `patterns`; every pattern must match one."""
    patterns = list(patterns)
    found, used = [], set()
    every = [tuple(path) for path, _ in model.iter_modules() if path]
    for path in every:
        hits = [p for p in patterns if matches(p, dotted(path))]
        if hits:
            found.append(path)
            used.update(hits)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ConfigError(
            f"peft.{key}: pattern {unused[0]!r} matches no module of the model; modules are named like "
            f"{', '.join(sorted({dotted(p) for p in every if len(p) <= 2}))}"
        )
    return found


def parent_of(root: nnx.Module, path: tuple) -> nnx.Module:
    node = root
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def replace(root: nnx.Module, path: tuple, new: nnx.Module) -> None:
    """Puts `new` at `path` (relative to `root`)."""
    parent, key = parent_of(root, path), path[-1]
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def adopt(new: nnx.Module, old: nnx.Module) -> None:
    """Gives `new` (an instance of a subclass made for the replacement) every attribute of `old`:
    its modules, parameters and settings, the same objects under the same names."""
    for name, value in vars(old).items():
        if not name.startswith("_pytree__"):
            setattr(new, name, value)
