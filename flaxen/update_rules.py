"""Rules that act on the parameters around the optimizer's update: what AdaLoRA's rank budget and
gradual magnitude pruning need (importance scores from the gradients, masks re-applied after every
update), written as optax transformations that wrap the run's optimizer.

Why here: the train step stays one generic `optimizer.update`; a rule's state (moving averages,
masks, its own step count) lives in the optimizer state, so checkpoints carry it and a resumed run
equals an uninterrupted one with no extra bookkeeping.

A rule is registered with `register(build)`, where `build(cfg, model, params)` returns None (the
rule is off for this run's config) or a function `wrap(optimizer) -> optimizer`. `wrap(cfg, model,
params, optimizer)` applies every active rule, in registration order (flaxen.state.from_config
calls it).
"""
from __future__ import annotations

from typing import Any, Callable

import optax

Wrapper = Callable[[optax.GradientTransformation], optax.GradientTransformation]
_RULES: list[Callable[[Any, Any, Any], Wrapper | None]] = []


def register(build: Callable[[Any, Any, Any], Wrapper | None]):
    """Adds a rule builder (see the module docstring); returns it, so it can decorate."""
    if build not in _RULES:
        _RULES.append(build)
    return build


def wrap(cfg: Any, model: Any, params: Any, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` wrapped by every rule active for `cfg` (a TrainConfig)."""
    _load_rules()
    for build in _RULES:
        wrapper = build(cfg, model, params)
        if wrapper is not None:
            optimizer = wrapper(optimizer)
    return optimizer


def _load_rules() -> None:
    """Imports the modules that register rules (each registers itself on import)."""
    from flaxen import adalora  # noqa: F401  (AdaLoRA's regulariser and rank budget)
    from flaxen import pruning  # noqa: F401  (gradual magnitude pruning)
