"""Differentially private fine-tuning (DP-SGD): the `privacy` config group, the sampling plan and
the privacy accountant.

Why: DP-SGD (Abadi et al. 2016) bounds what one training example can change in an update: every
example's gradient is clipped to L2 norm <= C, the clipped gradients of a batch are summed, and
Gaussian noise N(0, sigma^2 C^2) is added once to the sum before it is divided by the expected
batch size. With batches that include each example independently with probability q (Poisson
sampling), the privacy loss of T such steps is that of T compositions of the Poisson-subsampled
Gaussian mechanism, which an accountant turns into (epsilon, delta). The gradient part lives in
flaxen.steps (`private_gradient`); this module decides everything else once at start-up.

Config (configs/privacy/*.yaml, `privacy=dp_sgd`):
    name              none | dp_sgd
    clip_norm         C: each example's gradient is scaled to L2 norm <= C (over all trainable parameters)
    noise_multiplier  sigma: noise N(0, sigma^2 C^2) per coordinate of the summed clipped gradient
    target_epsilon    instead of sigma: the smallest sigma whose epsilon after `steps` steps at the
                      run's q and delta is <= target_epsilon (dp_accounting.calibrate_dp_mechanism,
                      a bracketing root search, tolerance 1e-4 in sigma)
    delta             null: 1 / n, n the number of training examples
    sampling          poisson | fixed (below)
    accountant        rdp (Renyi DP, Mironov 2017; the default) | pld (privacy loss distributions:
                      tighter, slower)
Neighbouring datasets differ by adding or removing one example (dp_accounting's ADD_OR_REMOVE_ONE).

What one example is: one stored record, which is exactly one train row for tasks whose rows are
records (`Task.example_rows`: seq_cls, token_cls). Language-model tasks cut a token stream into
windows (clm) or pack several sentences per row (mlm), and qa cuts one question into several
windows, so one record reaches several rows (or rows hold several records) and a per-row bound is
not a per-record bound: they are refused. Per-example loss: the task's loss on a batch of that one
row, normalised as the task normalises a batch (loss_sum / max(loss_weight, 1)): seq_cls, the
row's cross-entropy (squared error for regression); token_cls, the mean cross-entropy over the
row's scored tokens (each sentence weighs the same, whatever its length). Padding rows contribute 0.

Sampling and what epsilon means:
- `poisson` (the default): each step's batch holds every training example independently with
  probability q = batch_size / n, drawn from (seed, step) (flaxen.data.pipeline.PoissonLoader), so
  a resumed run draws the same batches. The batch has a fixed number of rows `max_rows`, the
  smallest multiple of the row granularity (micro_batch_size, else the mesh's batch shards) at or
  above the (1 - 1e-12) quantile of Binomial(n, q); the rows not drawn are masked padding. A draw
  above max_rows (probability <= 1e-12 per step) keeps a random max_rows of the drawn examples; it
  is counted (`truncated_batches` in results.json, and a message), since the accounting assumes
  untruncated batches. epsilon is then the accountant's epsilon of the Poisson-subsampled Gaussian
  mechanism composed `steps` times: a guarantee for the mechanism as implemented (up to
  floating-point and random-number-generator caveats).
- `fixed`: the run's usual batches (each epoch a shuffle of the train split cut into batches of
  batch_size) with the same q = batch_size / n in the accountant. That is the common practice,
  but shuffled fixed-size batches are not Poisson sampling and the reported epsilon is then an
  estimate, not a guarantee (the exact privacy of shuffled batches can be worse).
In both, the noisy sum is divided by batch_size (= q n, the expected batch size), and
data.length_grouping must be 0 (batches grouped by length are not uniform samples).

optimizer.clip_norm: the optimizer's global-norm clipping still applies, to the noisy mean
gradient. That is post-processing (it changes no epsilon) but it distorts the update, so the DP
presets set optimizer.clip_norm=0; per-example clipping is `privacy.clip_norm`.

Noise: from the run's key folded with the step (`jax.random.split(fold_in(rng, step))`: dropout
and noise streams), so a resumed run adds the same noise as an uninterrupted one. With gradient
accumulation (micro_batch_size) the clipped gradients of all micro-batches are summed first and
the noise is added once per batch (adding it per micro-batch would multiply its variance by the
number of micro-batches).

metrics.jsonl rows carry `epsilon` (after the row's step), `clipped_fraction` (of the batch's
examples whose gradient norm exceeded C) and `examples` (examples in the batch); results.json
holds `privacy`: epsilon, delta, noise_multiplier, sampling_rate, steps, accountant and the rest.
The accountant is the `dp-accounting` package (pip install 'flaxen[privacy]'), imported on first use.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from flaxen.errors import ConfigError

NAMES = ("none", "dp_sgd")
SAMPLINGS = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "pld")
# probability per step that a Poisson draw exceeds the batch's rows (see the module docstring)
OVERFLOW_PROBABILITY = 1e-12
# tolerance in sigma of the target-epsilon search
SIGMA_TOLERANCE = 1e-4


@dataclass
class PrivacyConfig:
    """DP-SGD (see flaxen/privacy.py): `name` none | dp_sgd; per-example `clip_norm`; either
    `noise_multiplier` or `target_epsilon`; `delta` (null: 1/n); `sampling` poisson | fixed;
    `accountant` rdp | pld."""
    name: str = "none"
    clip_norm: float = 1.0
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    delta: Optional[float] = None
    sampling: str = "poisson"
    accountant: str = "rdp"


def enabled(cfg: Any) -> bool:
    """Whether the TrainConfig `cfg` trains with DP-SGD."""
    privacy = cfg.get("privacy") if hasattr(cfg, "get") else getattr(cfg, "privacy", None)
    return privacy is not None and privacy.name != "none"


def check_config(cfg: Any, task: Any) -> None:
    """ConfigError naming the key for a `privacy` setting that cannot work (called by
    flaxen.config.validate)."""
    privacy = cfg.privacy
    if privacy.name not in NAMES:
        raise ConfigError(f"privacy.name={privacy.name!r}: expected one of {', '.join(NAMES)}")
    if privacy.name == "none":
        defaults = PrivacyConfig()
        for key in ("clip_norm", "noise_multiplier", "target_epsilon", "delta", "sampling", "accountant"):
            if getattr(privacy, key) != getattr(defaults, key):
                raise ConfigError(f"privacy.{key}={getattr(privacy, key)!r} has no effect with privacy.name=none: choose "
                                  "privacy=dp_sgd to train with differential privacy")
        return
    if privacy.clip_norm is None or not privacy.clip_norm > 0:
        raise ConfigError(f"privacy.clip_norm={privacy.clip_norm}: expected a positive per-example gradient norm bound")
    sigma, target = privacy.noise_multiplier, privacy.target_epsilon
    if sigma is not None and target is not None:
        raise ConfigError(f"privacy.noise_multiplier={sigma} and privacy.target_epsilon={target} are both set: give "
                          "one (set the other to null); a target epsilon chooses the noise multiplier")
    if sigma is None and target is None:
        raise ConfigError("privacy.noise_multiplier and privacy.target_epsilon are both null: set one")
    if sigma is not None and not sigma > 0:
        raise ConfigError(f"privacy.noise_multiplier={sigma}: expected a positive noise multiplier")
    if target is not None and not target > 0:
        raise ConfigError(f"privacy.target_epsilon={target}: expected a positive epsilon")
    if privacy.delta is not None and not 0 < privacy.delta < 1:
        raise ConfigError(f"privacy.delta={privacy.delta}: expected a value in (0, 1), or null for 1/n")
    if privacy.sampling not in SAMPLINGS:
        raise ConfigError(f"privacy.sampling={privacy.sampling!r}: expected one of {', '.join(SAMPLINGS)}")
    if privacy.accountant not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant={privacy.accountant!r}: expected one of {', '.join(ACCOUNTANTS)}")
    if not task.example_rows:
        raise ConfigError(f"privacy.name={privacy.name}: task {task.name}'s train rows are not one record each "
                          "(windows of a token stream, packed sentences or several windows per question), so "
                          "clipping per row bounds no example's influence; DP-SGD supports tasks whose rows are "
                          "records (seq_cls, token_cls)")
    if task.length_grouping(cfg.data) > 1:
        raise ConfigError(f"data.length_grouping={task.length_grouping(cfg.data)}: batches grouped by length are not "
                          f"uniform samples of the train split; set data.length_grouping=0 with "
                          f"privacy.name={privacy.name}")


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as error:
        raise ConfigError("privacy.name=dp_sgd needs the dp-accounting package: pip install 'flaxen[privacy]'") \
            from error
    return dp_accounting


def _event(sigma: float, sampling_rate: float, steps: int):
    dp_accounting = _dp_accounting()
    step = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(sigma))
    return dp_accounting.SelfComposedDpEvent(step, int(steps))


def _accountant(name: str):
    dp_accounting = _dp_accounting()
    if name == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    if name == "pld":
        return dp_accounting.pld.PLDAccountant()
    raise ConfigError(f"privacy.accountant={name!r}: expected one of {', '.join(ACCOUNTANTS)}")


def epsilon(sigma: float, sampling_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """epsilon at `delta` after `steps` steps of the Poisson-subsampled Gaussian mechanism with noise
    multiplier `sigma` and sampling rate `sampling_rate` (0 for no step)."""
    if steps <= 0:
        return 0.0
    counter = _accountant(accountant)
    counter.compose(_event(sigma, sampling_rate, steps))
    return float(counter.get_epsilon(delta))


def noise_multiplier_for(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
                         accountant: str = "rdp") -> float:
    """The smallest noise multiplier (within SIGMA_TOLERANCE) whose epsilon after `steps` steps is
    <= `target_epsilon`."""
    dp_accounting = _dp_accounting()
    sigma = float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant), lambda s: _event(s, sampling_rate, steps), float(target_epsilon),
        float(delta), bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=SIGMA_TOLERANCE))
    while epsilon(sigma, sampling_rate, steps, delta, accountant) > target_epsilon:  # the search's side of the root
        sigma += SIGMA_TOLERANCE
    return sigma


def poisson_max_rows(expected: int, num_examples: int, multiple: int = 1,
                     overflow_probability: float = OVERFLOW_PROBABILITY) -> int:
    """Rows of a Poisson batch: the smallest multiple of `multiple` r with
    P(Binomial(num_examples, expected / num_examples) > r) <= overflow_probability."""
    from scipy import stats

    rate = min(expected / num_examples, 1.0)
    quantile = int(stats.binom.isf(overflow_probability, num_examples, rate))
    rows = max(quantile, expected, 1)
    return int(math.ceil(rows / multiple) * multiple)


@dataclass
class Plan:
    """What a DP-SGD run decided at start-up (flaxen.privacy.plan); the train step reads
    clip_norm, noise_multiplier and batch_size."""
    clip_norm: float
    noise_multiplier: float
    batch_size: int            # the expected batch size: the noisy sum is divided by it
    num_examples: int          # n
    sampling_rate: float       # q = batch_size / n
    delta: float
    sampling: str
    accountant: str
    steps: int                 # the run's step budget (target epsilon is met there)
    max_rows: int              # rows per step's batch (Poisson: the bound above; fixed: batch_size)
    target_epsilon: Optional[float] = None
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def epsilon(self, steps: int) -> float:
        """epsilon at `delta` after `steps` steps (cached per step count)."""
        if steps not in self._cache:
            self._cache[steps] = epsilon(self.noise_multiplier, self.sampling_rate, steps, self.delta,
                                         self.accountant)
        return self._cache[steps]

    def record(self, steps: int, **extra) -> dict:
        """The results.json entry after `steps` steps."""
        return {"mechanism": "dp_sgd", "epsilon": self.epsilon(steps), "delta": self.delta,
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "sampling_rate": self.sampling_rate, "steps": int(steps), "expected_batch_size": self.batch_size,
                "num_examples": self.num_examples, "sampling": self.sampling, "accountant": self.accountant,
                "target_epsilon": self.target_epsilon, "max_rows": self.max_rows,
                "accounting": ("Poisson-subsampled Gaussian mechanism, add/remove-one neighbours" +
                               ("" if self.sampling == "poisson" else
                                "; the batches were shuffled fixed-size batches, accounted as Poisson sampling "
                                "with the same rate: an estimate, not a guarantee")),
                **extra}

    def describe(self) -> str:
        how = (f"target epsilon {self.target_epsilon:g} -> " if self.target_epsilon is not None else "")
        return (f"DP-SGD: clip norm {self.clip_norm:g}, {how}noise multiplier {self.noise_multiplier:.4f}, "
                f"{self.sampling} sampling q = {self.batch_size}/{self.num_examples} = {self.sampling_rate:.5g}"
                + (f" ({self.max_rows} rows per batch)" if self.sampling == "poisson" else "")
                + f", delta {self.delta:.3g}; epsilon after {self.steps} steps: {self.epsilon(self.steps):.4g} "
                  f"({self.accountant})")


def plan(cfg: Any, num_examples: int, row_multiple: int = 1) -> Optional[Plan]:
    """The Plan of the TrainConfig `cfg` for a train split of `num_examples` examples (None without
    privacy). `row_multiple`: what a batch's rows must be a multiple of (the mesh's batch shards
    times the processes); micro_batch_size, when set, is used instead."""
    if not enabled(cfg):
        return None
    privacy = cfg.privacy
    n = int(num_examples)
    if cfg.batch_size > n:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {n} training examples: the sampling rate "
                          "batch_size / n must be below 1")
    rate = cfg.batch_size / n
    delta = float(privacy.delta) if privacy.delta is not None else 1.0 / n
    if privacy.target_epsilon is not None:
        sigma = noise_multiplier_for(privacy.target_epsilon, rate, cfg.steps, delta, privacy.accountant)
    else:
        sigma = float(privacy.noise_multiplier)
    if privacy.sampling == "poisson":
        max_rows = poisson_max_rows(cfg.batch_size, n, cfg.micro_batch_size or row_multiple)
    else:
        max_rows = int(cfg.batch_size)
    return Plan(clip_norm=float(privacy.clip_norm), noise_multiplier=sigma, batch_size=int(cfg.batch_size),
                num_examples=n, sampling_rate=rate, delta=delta, sampling=privacy.sampling,
                accountant=privacy.accountant, steps=int(cfg.steps), max_rows=max_rows,
                target_epsilon=None if privacy.target_epsilon is None else float(privacy.target_epsilon))
