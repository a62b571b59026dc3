"""The masked-LM head at the masked positions only (task.max_predictions_per_row): loss, gradients
and evaluation outputs against the vocabulary projection at every position on the same batch and
dropout key; the per-row cap of the masking (encoding.mlm_row, the task's loader); the derived
default against scipy's binomial tail; config and data errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf
from scipy import stats

import models
from flaxen import steps, tasks
from flaxen.config import compose
from flaxen.data import DataConfig, SyntheticConfig, TokenizerConfig, encoding, load_task_data
from flaxen.errors import ConfigError, DataError
from flaxen.tasks.mlm import default_max_predictions
from models.errors import ConfigError as ModelConfigError

IGNORE = -100
VOCAB, LENGTH, CAP = 97, 24, 6


def bound_mlm(cap, window_length=LENGTH, probability=0.15):
    cfg = OmegaConf.create({"task": {"max_predictions_per_row": cap},
                            "data": {"window_length": window_length, "mlm_probability": probability}})
    return tasks.get("mlm").bind(cfg)


@pytest.fixture(scope="module")
def model():
    config = models.ModelConfig(family="bert", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                                intermediate_size=64, max_position_embeddings=64, hidden_dropout=0.1,
                                attention_dropout=0.1)
    return models.build_model(config, "mlm", seed=0)


@pytest.fixture(scope="module")
def batch():
    """5 rows: masked counts 0 (the whole row unscored), CAP (full), and three in between; the last
    row is a padding row (valid 0, shorter attention)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(3, VOCAB, (5, LENGTH)).astype(np.int32)
    labels = np.full((5, LENGTH), IGNORE, np.int32)
    for row, count in enumerate([0, CAP, 3, 1, 4]):
        where = rng.choice(np.arange(1, LENGTH - 1), count, replace=False)
        labels[row, where] = ids[row, where]
        ids[row, where] = 2  # the mask id
    mask = np.ones((5, LENGTH), np.int32)
    mask[4, LENGTH // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids), "labels": labels,
            "valid": np.array([1, 1, 1, 1, 0], np.int32)}


def full_projection_loss(graphdef, params, rest, batch, rng):
    """The reference: the head at every position, cross-entropy (log-softmax written out) averaged
    over the labelled positions."""
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], deterministic=False,
                   dropout_rng=rng).logits
    assert logits.shape == (*batch["input_ids"].shape, VOCAB)
    scored = batch["labels"] != IGNORE
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.where(scored, batch["labels"], 0)[..., None],
                                 -1)[..., 0]
    return -jnp.sum(jnp.where(scored, picked, 0.0)) / jnp.sum(scored)


def task_loss(task, graphdef, params, rest, batch, rng):
    """The loss as flaxen's train step computes it (flaxen.steps)."""
    model = nnx.merge(graphdef, params, rest)
    output = model(batch["input_ids"], **task.model_inputs(batch), deterministic=False, dropout_rng=rng)
    loss_sum, _ = task.loss_terms(output, batch)
    return loss_sum / jnp.maximum(task.loss_weight(batch), 1.0)


def close(actual, expected, tolerance=1e-5):
    """Equal within `tolerance` relative to the larger of 1 and the reference's largest magnitude."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    return float(np.max(np.abs(actual - expected), initial=0.0)) <= tolerance * scale


def test_gathered_loss_and_gradients_equal_the_full_projection(model, batch):
    task = bound_mlm(CAP)
    assert task.gather_size(LENGTH) == CAP
    inputs = task.model_inputs(batch)
    assert inputs["masked_positions"].shape == (5, CAP)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = jax.random.key(7)
    reference, reference_grads = jax.jit(jax.value_and_grad(full_projection_loss, argnums=1),
                                         static_argnums=0)(graphdef, params, rest, batch, rng)
    gathered_fn = jax.jit(jax.value_and_grad(lambda p, b, k: task_loss(task, graphdef, p, rest, b, k)))
    loss, grads = gathered_fn(params, batch, rng)
    assert np.isfinite(float(reference)) and close(loss, reference)
    flat, flat_reference = jax.tree.leaves_with_path(grads), jax.tree.leaves(reference_grads)
    assert len(flat) == len(flat_reference) > 10
    for (path, grad), expected in zip(flat, flat_reference):
        assert np.any(np.asarray(expected) != 0), jax.tree_util.keystr(path)
        assert close(grad, expected), (jax.tree_util.keystr(path), float(np.max(np.abs(grad - expected))))
    # dropout is on (both paths used the same key): another key gives another loss
    assert not close(gathered_fn(params, batch, jax.random.key(8))[0], loss, 1e-7)


def test_gathered_logits_and_eval_outputs_equal_the_full_pass(model, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    full_task, task = bound_mlm(0), bound_mlm(CAP)
    assert "masked_positions" not in full_task.model_inputs(batch)
    full, gathered = (jax.jit(steps.make_eval_step(graphdef, t))(params, rest, batch) for t in (full_task, task))
    for key in ("loss_sum", "weight", "correct"):
        assert close(gathered[key], full[key]), key
    assert float(full["weight"]) == np.sum(batch["labels"] != IGNORE) == 14
    # the model's API: logits at the given positions are the full logits gathered there
    positions = task.model_inputs(batch)["masked_positions"]
    everywhere = model(batch["input_ids"], batch["attention_mask"]).logits
    at = model(batch["input_ids"], batch["attention_mask"], masked_positions=positions).logits
    assert at.shape == (5, CAP, VOCAB)
    assert close(at, jnp.take_along_axis(everywhere, positions[..., None], axis=1))
    # a row without a masked token gathers CAP unused slots, all unscored
    assert np.all(np.asarray(task.scored_labels(batch))[0] == IGNORE)


def test_masked_positions_need_a_positionwise_head():
    config = models.ModelConfig(family="bert", vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
                                intermediate_size=32, max_position_embeddings=32)
    classifier = models.build_model(config, "seq_cls", seed=0)
    with pytest.raises(ModelConfigError, match="masked_positions: head 'seq_cls'.*'mlm'"):
        classifier(jnp.ones((1, 8), jnp.int32), masked_positions=jnp.zeros((1, 2), jnp.int32))


def test_mlm_row_cap_keeps_a_random_subset_and_leaves_other_rows_as_they_were():
    random_ids = np.arange(5, 50, dtype=np.int32)
    capped_rows = 0
    for seed in range(200):
        ids = np.random.default_rng(seed).integers(5, 50, 30).astype(np.int32)
        plain = encoding.mlm_row(_tokenizer(), ids, np.random.default_rng([seed]), 0.3, random_ids)
        capped = encoding.mlm_row(_tokenizer(), ids, np.random.default_rng([seed]), 0.3, random_ids, CAP)
        chosen, kept = plain["labels"] != IGNORE, capped["labels"] != IGNORE
        assert len(chosen) == 32 and not chosen[0] and not chosen[-1]
        assert kept.sum() == min(chosen.sum(), CAP)
        assert not np.any(kept & ~chosen)
        if chosen.sum() <= CAP:
            assert all(np.array_equal(plain[k], capped[k]) for k in plain)
        else:
            capped_rows += 1
            dropped = chosen & ~kept
            original = np.where(chosen, plain["labels"], plain["input_ids"])
            assert np.array_equal(capped["input_ids"][dropped], original[dropped])
            assert np.array_equal(capped["input_ids"][kept], plain["input_ids"][kept])
    assert 100 < capped_rows < 200  # 30 tokens at 30 %: 9 expected, so most rows draw more than CAP


_TOKENIZERS = {}


def _tokenizer():
    """A word-level flaxen tokenizer with [CLS] ... [SEP] rows (ids 2 and 3)."""
    if not _TOKENIZERS:
        import tokenizers

        from flaxen.data.tokenizers import Tokenizer

        vocab = {"[PAD]": 0, "[MASK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i for i in range(4, 50)}}
        backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab))
        backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        backend.add_special_tokens(["[PAD]", "[MASK]", "[CLS]", "[SEP]"])
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        _TOKENIZERS["word"] = Tokenizer(backend, {"pad": "[PAD]", "mask": "[MASK]", "cls": "[CLS]", "sep": "[SEP]"},
                                        kind="word")
    return _TOKENIZERS["word"]


def test_the_task_loader_keeps_every_row_within_the_cap(tmp_path_factory):
    """Real packed rows at 50 % masking: with the cap every row holds at most CAP labels, and each
    row is the uncapped run's row where that one was within the cap."""
    prepared = str(tmp_path_factory.mktemp("prepared"))
    spec = SyntheticConfig(kind="corpus", seed=3, num_train=60, num_validation=150)
    cfg = DataConfig(name="q_corpus", source="synthetic", synthetic=spec, tokenizer=TokenizerConfig(kind="word"),
                     prepared_dir=prepared, window_length=LENGTH, max_length=LENGTH, bucket_lengths=[LENGTH],
                     mlm_probability=0.5)
    batches = {}
    for cap in (CAP, 0):
        data = load_task_data(cfg, bound_mlm(cap, probability=0.5), prepared)
        batches[cap] = list(data.loader("validation", 16, seed=0, train=False))
    capped = within = 0
    for with_cap, without in zip(batches[CAP], batches[0]):
        counts = np.sum(with_cap["labels"] != IGNORE, axis=1)
        uncapped = np.sum(without["labels"] != IGNORE, axis=1)
        assert np.all(counts == np.minimum(uncapped, CAP))
        for row in np.flatnonzero(uncapped <= CAP):
            within += 1
            assert all(np.array_equal(with_cap[k][row], without[k][row]) for k in ("input_ids", "labels"))
        capped += int(np.sum(uncapped > CAP))
    assert capped > 20 and within > 0


def test_collate_refuses_a_row_over_the_cap():
    row = {"input_ids": np.arange(8, dtype=np.int32), "token_type_ids": np.zeros(8, np.int32),
           "labels": np.array([IGNORE, 4, 5, 6, IGNORE, IGNORE, IGNORE, IGNORE], np.int32)}
    assert bound_mlm(3).collate([row], 1, [8], 0)["labels"].shape == (1, 8)
    with pytest.raises(DataError, match="3 masked tokens, more than task.max_predictions_per_row=2"):
        bound_mlm(2).collate([row], 1, [8], 0)


@pytest.mark.parametrize("length,probability", [(128, 0.15), (512, 0.15), (64, 0.3), (24, 0.15)])
def test_derived_cap_is_the_binomial_tail_bound(length, probability):
    cap = default_max_predictions(length, probability)
    binomial = stats.binom(length, probability)
    assert binomial.sf(cap) <= 1e-6 < binomial.sf(cap - 1)


def test_config_resolves_and_checks_the_key():
    cfg = compose(["experiment=bert_mini_mlm"])
    assert cfg.task.max_predictions_per_row is None
    assert tasks.for_run(cfg).max_predictions == 41
    bert_cap = tasks.for_run(compose(["experiment=bert_mini_mlm", "task.max_predictions_per_row=20"]))
    assert bert_cap.max_predictions == 20 and bert_cap.gather_size(128) == 20
    full = tasks.for_run(compose(["experiment=bert_mini_mlm", "task.max_predictions_per_row=0"]))
    assert full.gather_size(128) is None and full.row_cap(cfg.data) is None
    for bad in ("-1", "129"):
        with pytest.raises(ConfigError, match=rf"task.max_predictions_per_row={bad}: expected null .* at most "
                                              r"data.window_length=128"):
            compose(["experiment=bert_mini_mlm", f"task.max_predictions_per_row={bad}"])
