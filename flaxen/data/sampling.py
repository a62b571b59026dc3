"""Which train examples a run sees: few-shot subsets, balanced class weights, balanced resampling.

Pure numpy over per-example class ids or per-sentence mention counts, which the task computes
(flaxen/tasks/seq_cls.py, token_cls.py); every draw is a function of its seed alone (numpy's
SeedSequence, no Python hashing), so it is the same in every process and on every machine.

- `examples_per_class(classes, k, seed, names)` (seq_cls, data.train_examples_per_class=K): for
  each class, the first K of a permutation of its examples seeded by (seed, class). The K-shot
  subset of a seed is therefore contained in its (K+1)-shot subset, and one class's draw does not
  depend on the other classes. K may also be a mapping {label name: count} (seq_cls,
  data.train_examples_per_class={"1": 3757}): each named label keeps the first `count` of the same
  permutation, the labels not named keep every example. So {every label: K} is the K-shot subset,
  and subsampling one label (an imbalanced split made from a balanced one) leaves the others whole.
  `examples_per_class_setting` reads and checks the config value; `subset_key` makes it a cache key.
- `greedy_cover(counts, k, seed, names)` (token_cls): the greedy sampling of few-shot NER
  (Yang & Katiyar 2020, "Simple and Effective Few-Shot Named Entity Recognition with Structured
  Nearest Neighbor Learning"; Ding et al. 2021, Few-NERD). Pass 1 goes through the sentences in
  a permutation seeded by `seed` and adds a sentence when it holds a mention of some type that
  still has fewer than K mentions in the subset. Pass 2 goes through the chosen sentences in the
  order they were added and drops each one whose removal leaves every type with at least K
  mentions. Guarantees: (a) every type has at least K mentions in the subset; (b) the subset is
  minimal: removing any one of its sentences leaves some type with fewer than K, so no sentence
  is there only for types already past K (which keeps the counts near K); (c) sentences without
  mentions are never chosen.
- `balanced_weights(counts)`: scikit-learn's `class_weight="balanced"`, n / (C * n_c).
- `balanced_epochs(items, classes, seed)` (data.resample=balanced): an endless grain dataset whose
  epoch e holds every class exactly m times (m: the largest class's count), so one epoch is C * m
  rows: a class of n_c examples repeats each of them m // n_c times and adds m % n_c of them drawn
  without replacement, then the epoch is shuffled; all from (seed, e), so a position's row is a
  pure function of the position and a loader resumes exactly.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Sequence, Union

import numpy as np

from flaxen.errors import ConfigError

ENDLESS = 1 << 62


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


KEY = "data.train_examples_per_class"
Setting = Union[int, dict]  # K, or {label name: count}


def examples_per_class_setting(value: Any, key: str = KEY) -> Setting | None:
    """data.train_examples_per_class as plain Python: None, a positive int K, or a dict {label name
    (str): positive count} (keys as written; YAML's `{1: 3757}` is the label "1"). ConfigError
    naming `key` and what was expected for anything else."""
    expected = ("expected a positive number of examples per class, or a mapping from label name to a positive "
                "count (e.g. {\"1\": 3757}; labels not named keep all their examples), or null (the whole train split)")
    if value is None:
        return None
    if isinstance(value, Mapping):
        setting = {}
        for name, count in value.items():
            label = str(name)
            if label in setting:
                raise ConfigError(f"{key}={dict(value)}: label {label!r} is given twice")
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
                raise ConfigError(f"{key}={dict(value)}: label {label!r} has count {count!r}; {expected}")
            setting[label] = int(count)
        if not setting:
            raise ConfigError(f"{key}={{}}: {expected}")
        return setting
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{key}={value}: {expected}")
    return int(value)


def subset_key(value: Any) -> Any:
    """A hashable form of data.train_examples_per_class (K, or the sorted (label, count) pairs of a
    mapping), for caches."""
    setting = examples_per_class_setting(value)
    return tuple(sorted(setting.items())) if isinstance(setting, dict) else setting


def examples_per_class(classes: Sequence[int], k: Any, seed: int, names: Sequence[str],
                       key: str = KEY) -> np.ndarray:
    """Ascending indices of K examples of each class (`classes[i]`: example i's class id, an index
    into `names`), or with a mapping `k` {label name: count}, `count` examples of each named label and
    every example of the others. ConfigError naming `key`, the label and its count when a label has
    fewer examples than asked, or when a mapping names a label that is not in `names`."""
    classes = np.asarray(classes, np.int64)
    names = [str(name) for name in names]
    setting = examples_per_class_setting(k, key)
    if isinstance(setting, dict):
        unknown = [label for label in setting if label not in names]
        if unknown:
            raise ConfigError(f"{key}={setting}: label {unknown[0]!r} is not a label of the data "
                              f"(labels: {', '.join(names)})")
    chosen = []
    for c, name in enumerate(names):
        members = np.flatnonzero(classes == c)
        wanted = setting if isinstance(setting, int) else setting.get(name)
        if wanted is None:
            chosen.append(members)
            continue
        if len(members) < wanted:
            raise ConfigError(f"{key}={setting}: label {name!r} has only {len(members)} examples in the train split")
        chosen.append(members[_rng(seed, 11, c).permutation(len(members))[:wanted]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def greedy_cover(counts: np.ndarray, k: int, seed: int, names: Sequence[str],
                 key: str = "data.train_examples_per_class") -> np.ndarray:
    """Ascending indices of the sentences chosen by greedy sampling (see the module docstring).
    `counts` [sentences, types]: mentions of each type in each sentence. ConfigError naming `key`,
    the type and its count when the split has fewer than K mentions of a type."""
    counts = np.asarray(counts, np.int64).reshape(len(counts), len(names))
    totals = counts.sum(0)
    for name, total in zip(names, totals):
        if total < k:
            raise ConfigError(f"{key}={k}: entity type {name!r} has only {int(total)} mentions in the train split")
    have = np.zeros(len(names), np.int64)
    added = []
    for index in _rng(seed, 12).permutation(len(counts)):
        if np.any((counts[index] > 0) & (have < k)):
            added.append(int(index))
            have += counts[index]
    kept = []
    for index in added:
        if np.all(have - counts[index] >= k):
            have -= counts[index]
        else:
            kept.append(index)
    return np.asarray(sorted(kept), np.int64)


def balanced_weights(counts: Sequence[int], names: Sequence[str], key: str = "task.class_weights") -> np.ndarray:
    """n_samples / (n_classes * count_c) per class (scikit-learn's "balanced"), float64 [classes];
    ConfigError naming the class when it has no example."""
    counts = np.asarray(counts, np.float64)
    for name, count in zip(names, counts):
        if count == 0:
            raise ConfigError(f"{key}=balanced: label {name!r} never occurs in the train split, so it has no "
                              "inverse frequency; give the weights as a list")
    return counts.sum() / (len(counts) * counts)


class WindowCache:
    """`cache[index]` = `build(index)`, kept for the two most recent windows a loader computed
    (epochs of BalancedEpochs, length-grouped batch windows in flaxen.data.pipeline): its prefetch
    threads share one build of the window they read, and memory stays bounded."""

    def __init__(self, build):
        self.build = build
        self._lock = threading.Lock()
        self._values: dict[int, Any] = {}

    def __getitem__(self, index: int):
        with self._lock:
            if index in self._values:
                return self._values[index]
        value = self.build(index)
        with self._lock:
            self._values[index] = value
            for old in sorted(self._values)[:-2]:
                del self._values[old]
        return value


class BalancedEpochs:
    """Position -> index of an example, epoch after epoch (see the module docstring); `length`: one
    epoch's positions (C * m). Classes without examples take no part."""

    def __init__(self, classes: Sequence[int], seed: int):
        classes = np.asarray(classes, np.int64)
        self.members = [np.flatnonzero(classes == c) for c in np.unique(classes)]
        self.per_class = max((len(m) for m in self.members), default=0)
        self.length = self.per_class * len(self.members)
        self.seed = seed
        self._epochs = WindowCache(self._draw)

    def epoch(self, epoch: int) -> np.ndarray:
        """The example indices of `epoch`, in the order it draws them [length]."""
        return self._epochs[epoch]

    def _draw(self, epoch: int) -> np.ndarray:
        rng = _rng(self.seed, 13, epoch)
        drawn = []
        for members in self.members:
            repeats, rest = divmod(self.per_class, len(members))
            drawn += [np.tile(members, repeats), rng.choice(members, rest, replace=False)]
        return np.concatenate(drawn)[rng.permutation(self.length)]

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.length)
        return int(self.epoch(epoch)[offset])


def balanced_epochs(items: Sequence[Any], classes: Sequence[int], seed: int):
    """An endless grain MapDataset over `items` whose every epoch draws each class equally often
    (BalancedEpochs; `classes[i]`: item i's class)."""
    import grain

    if len(items) == 0:
        raise ConfigError("data.resample=balanced: the train split has no examples")
    sampler = BalancedEpochs(classes, seed)
    return grain.MapDataset.range(ENDLESS).map(lambda position: items[sampler(position)])
