"""One sharded train state and its jitted steps: what training, evaluation, the ahead-of-time memory
report and the benchmarks all build, so each compiles exactly the program a run executes.

    setup = state.build(model, task, mesh, rules, optimizer_cfg=cfg.optimizer, schedule=schedule,
                        trainable_filter=..., accum_steps=...)
    setup.params, setup.opt_state, setup.rest          # sharded over the mesh
    setup.train_step(params, opt_state, rest, batch, step, rng) -> (params, opt_state, metrics)
    setup.eval_step(params, rest, batch) -> the task's eval outputs

With `privacy` (a flaxen.privacy.Plan: DP-SGD) the train step is flaxen.steps' private step, with
the same signature; a Poisson-sampled batch has `privacy.max_rows` rows, cut into micro-batches of
micro_batch_size rows when set.

The model is split once into `params` (what trains: `trainable_filter`), and `rest` (frozen weights
and other variables: no gradients, no optimizer state); shardings come from each parameter's
logical axis names and `rules` (flaxen.sharding). Without `optimizer_cfg` only the eval step
exists. With `abstract=True` nothing is allocated: `model` may have ShapeDtypeStruct leaves and the
state holds ShapeDtypeStructs carrying the shardings (scripts/aot_compile.py lowers the step on them).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
from flax import nnx

from flaxen import optim, sharding, steps, tasks, update_rules
from flaxen.modeling import abstract_like

# Dropout keys: XLA's RngBitGenerator ("rbg") compiles to one op, where threefry unrolls into
# many (it doubled the train step's compile time of a small BERT on CPU).
RNG_IMPL = "rbg"


@dataclasses.dataclass
class TrainSetup:
    """The split model on a mesh with its shardings, optimizer and steps (see the module docstring)."""
    task: Any
    mesh: Any
    graphdef: Any
    params: Any
    rest: Any
    param_shardings: Any
    rest_shardings: Any
    batch_sharding: Any
    replicated: Any
    activation_sharding: Any
    optimizer: Any = None
    schedule: Callable | None = None
    opt_state: Any = None
    opt_shardings: Any = None
    accum_steps: int = 1
    privacy: Any = None
    row_lengths: tuple = ()

    @functools.cached_property
    def train_step(self):
        if self.optimizer is None:
            raise ValueError("this setup was built without an optimizer: it has an eval step only")
        if self.privacy is not None:
            return steps.make_private_train_step(
                self.graphdef, self.task, self.optimizer, self.privacy, schedule=self.schedule,
                accum_steps=self.accum_steps, lengths=self.row_lengths, param_shardings=self.param_shardings,
                opt_shardings=self.opt_shardings,
                rest_shardings=self.rest_shardings, batch_sharding=self.batch_sharding, replicated=self.replicated)
        return steps.make_train_step(
            self.graphdef, self.task, self.optimizer, schedule=self.schedule, accum_steps=self.accum_steps,
            param_shardings=self.param_shardings, opt_shardings=self.opt_shardings,
            rest_shardings=self.rest_shardings, batch_sharding=self.batch_sharding, replicated=self.replicated,
            activation_sharding=self.activation_sharding)

    @functools.cached_property
    def eval_step(self):
        return steps.make_eval_step(self.graphdef, self.task, param_shardings=self.param_shardings,
                                    rest_shardings=self.rest_shardings, batch_sharding=self.batch_sharding,
                                    replicated=self.replicated, activation_sharding=self.activation_sharding)

    def put_batch(self, batch: dict) -> dict:
        """A host batch as global arrays sharded over the mesh's batch axes."""
        return sharding.put_batch(batch, self.batch_sharding)


def build(model: nnx.Module, task: Any, mesh, rules: dict, *, optimizer_cfg: Any = None, schedule=None,
          trainable_filter: Any = nnx.Param, accum_steps: int = 1, abstract: bool = False,
          privacy: Any = None, row_lengths: tuple = (), wrap_optimizer: Callable | None = None) -> TrainSetup:
    """The TrainSetup of `model` for `task` (a Task or its name) on `mesh` (see the module docstring).

    `schedule`: the learning-rate schedule the optimizer follows (optax schedule); `optimizer_cfg`:
    flaxen.config.OptimizerConfig (None: evaluation only). The weight-decay mask comes from the
    model (flaxen.optim.decay_mask). `privacy`: a flaxen.privacy.Plan for DP-SGD (None: the usual step);
    `row_lengths`: the lengths its micro-batches may be cut to (the data's bucket lengths).
    `wrap_optimizer(optimizer, model, params)`: the optimizer wrapped by parameter rules
    (flaxen.update_rules: AdaLoRA's budget, gradual pruning); None: the optimizer as configured."""
    task = tasks.get(task)
    graphdef, params, rest = nnx.split(model, trainable_filter, ...)
    param_shardings = sharding.state_shardings(mesh, params, rules)
    rest_shardings = sharding.state_shardings(mesh, rest, rules)
    if abstract:
        params, rest = abstract_like(params, param_shardings), abstract_like(rest, rest_shardings)
    else:
        params, rest = jax.device_put(params, param_shardings), jax.device_put(rest, rest_shardings)
    setup = TrainSetup(task=task, mesh=mesh, graphdef=graphdef, params=params, rest=rest,
                       param_shardings=param_shardings, rest_shardings=rest_shardings,
                       batch_sharding=sharding.batch_sharding(mesh), replicated=sharding.replicated(mesh),
                       activation_sharding=sharding.activation_sharding(mesh, rules), accum_steps=accum_steps,
                       privacy=privacy, row_lengths=tuple(row_lengths))
    if optimizer_cfg is None:
        return setup
    setup.schedule = schedule
    setup.optimizer = optim.make_optimizer(optimizer_cfg, schedule, optim.decay_mask(model, params))
    if wrap_optimizer is not None:
        setup.optimizer = wrap_optimizer(setup.optimizer, model, params)
    opt_state = jax.eval_shape(setup.optimizer.init, params)
    setup.opt_shardings = sharding.optimizer_state_shardings(mesh, opt_state, params, param_shardings)
    if abstract:
        setup.opt_state = abstract_like(opt_state, setup.opt_shardings)
    else:
        setup.opt_state = jax.jit(setup.optimizer.init, out_shardings=setup.opt_shardings)(params)
    return setup


def from_config(cfg: Any, model: nnx.Module, *, mesh=None, trainable_filter: Any = nnx.Param,
                abstract: bool = False, with_optimizer: bool = True, privacy: Any = None) -> TrainSetup:
    """`build` with everything taken from a composed TrainConfig: the task, the mesh (`mesh` or
    cfg.mesh over all devices), logical-axis rules, optimizer, schedule and gradient accumulation.
    `privacy`: the run's flaxen.privacy.Plan (flaxen.privacy.plan) for DP-SGD; its batches have
    `privacy.max_rows` rows."""
    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    rows = cfg.batch_size if privacy is None else privacy.max_rows
    micro_batch = cfg.micro_batch_size or rows
    schedule = optim.make_schedule(cfg.schedule, cfg.optimizer.lr, cfg.steps) if with_optimizer else None
    return build(model, tasks.for_run(cfg), mesh, dict(cfg.mesh.logical_axis_rules),
                 optimizer_cfg=cfg.optimizer if with_optimizer else None, schedule=schedule,
                 trainable_filter=trainable_filter, accum_steps=rows // micro_batch, abstract=abstract,
                 privacy=privacy,
                 row_lengths=tuple(tasks.get(cfg.task.name).buckets(cfg.data)) if privacy is not None else (),
                 wrap_optimizer=lambda optimizer, model, params: update_rules.wrap(cfg, model, params, optimizer))
