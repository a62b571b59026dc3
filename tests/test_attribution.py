"""flaxen.attribution against independent references, the tasks' attribution targets, and
scripts/explain.py.

References: captum 0.9's IntegratedGradients over `inputs_embeds` of transformers' PyTorch BERT
holding the same (randomly initialised, perturbed) weights, with the same baseline, steps and
quadrature rule (seq_cls, token_cls, and the start and end logits of qa); the completeness axiom
(attributions sum to f(x) - f(baseline), f from plain forward passes); jax.grad of the model
called on its embeddings; captum's quadrature points and weights; exact integrals of polynomials.
"""
import html
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from captum.attr import IntegratedGradients
from captum.attr._utils.approximation_methods import approximation_parameters
from flax import nnx

import models
from flaxen import attribution, tasks
from flaxen.errors import ConfigError
from flaxen.tasks.base import AttributionTarget

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = models.ModelConfig(family="bert", vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=37, max_position_embeddings=64, pad_token_id=0)
NUM_LABELS = 3
# one example: [CLS]-like first id, a pair with token types, no padding
IDS = np.array([2, 17, 45, 8, 61, 3, 33, 90, 12, 3], np.int32)
TYPES = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], np.int32)
HF_CLASSES = {"seq_cls": transformers.BertForSequenceClassification,
              "token_cls": transformers.BertForTokenClassification,
              "qa": transformers.BertForQuestionAnswering}


def _perturbed(head, seed):
    """A tiny BERT with `head` whose every parameter is moved off its initial value (so LayerNorm
    scales, biases and the head all matter)."""
    model = models.build_model(CONFIG, head, NUM_LABELS, seed=seed)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """head -> (flaxen model, the same weights in transformers' PyTorch class, eval mode, f32)."""
    out = {}
    for seed, (head, cls) in enumerate(HF_CLASSES.items()):
        model = _perturbed(head, seed)
        path = models.save_pretrained(model, tmp_path_factory.mktemp(head))
        out[head] = model, cls.from_pretrained(path, attn_implementation="eager").eval().float()
    return out


def _captum(torch_model, field, target, baseline, steps, method):
    """captum's IntegratedGradients over inputs_embeds of IDS: per-token attributions [seq]."""
    ids = torch.tensor(IDS[None].astype(np.int64))
    embeds = torch_model.bert.embeddings.word_embeddings(ids).detach()
    if isinstance(baseline, str):
        base = torch.zeros_like(embeds) if baseline == "zeros" else \
            torch_model.bert.embeddings.word_embeddings(torch.zeros_like(ids)).detach()
    else:
        base = torch.tensor(baseline[None])

    def forward(inputs_embeds, attention_mask, token_type_ids):
        output = torch_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return getattr(output, field)

    extra = (torch.ones_like(ids), torch.tensor(TYPES[None].astype(np.int64)))
    scores = IntegratedGradients(forward).attribute(embeds, baselines=base, target=target, additional_forward_args=extra,
                                                    n_steps=steps, method=method, internal_batch_size=steps)
    return scores.sum(-1)[0].detach().numpy()


def _close(ours, reference, tol=1e-4):
    """max |ours - reference| within `tol` of the reference's scale (its largest |value|)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    scale = np.max(np.abs(reference))
    assert scale > 0
    error = np.max(np.abs(ours - reference))
    assert error <= tol * scale, (error, scale, ours, reference)


# ----------------------------------------------------------------------------- quadrature


@pytest.mark.parametrize("method", attribution.METHODS)
def test_quadrature_points_and_weights_are_captums(method):
    """Points and weights equal captum's; the trapezoid's weights are captum's times n/(n-1), so
    that ours sum to 1 (captum's riemann_trapezoid weights sum to (n-1)/n)."""
    n = 12
    points, weights = attribution.quadrature(n, method)
    step_sizes, alphas = approximation_parameters(method)
    np.testing.assert_allclose(points, alphas(n), atol=1e-7)
    scale = n / (n - 1) if method == "riemann_trapezoid" else 1.0
    np.testing.assert_allclose(weights, np.asarray(step_sizes(n)) * scale, rtol=1e-12)
    assert abs(weights.sum() - 1.0) < 1e-12


def test_quadrature_integrates_polynomials_exactly():
    """Gauss-Legendre with n points is exact up to degree 2n-1, the trapezoid and midpoint rules
    for straight lines (exact integrals: the integral of a**d over [0, 1] is 1/(d+1))."""
    points, weights = attribution.quadrature(5, "gausslegendre")
    for degree in range(10):
        assert abs(weights @ points ** degree - 1 / (degree + 1)) < 1e-13
    for method in ("riemann_trapezoid", "riemann_middle"):
        points, weights = attribution.quadrature(7, method)
        assert abs(weights @ (3 * points + 2) - 3.5) < 1e-13


def test_quadrature_rejects_bad_settings():
    with pytest.raises(ConfigError, match="method='simpson': expected one of gausslegendre"):
        attribution.quadrature(8, "simpson")
    with pytest.raises(ConfigError, match="steps=1: expected an integer >= 2 for method=riemann_trapezoid"):
        attribution.quadrature(1, "riemann_trapezoid")
    with pytest.raises(ConfigError, match="steps=0"):
        attribution.quadrature(0)


# ----------------------------------------------------------------------------- completeness


def _direct_value(model, embeds, target):
    """f at embeddings [seq, embed] by a plain forward pass (no attribution code)."""
    output = model(inputs_embeds=jnp.asarray(embeds)[None], attention_mask=jnp.ones((1, len(IDS)), jnp.int32),
                   token_type_ids=jnp.asarray(TYPES)[None])
    return float(getattr(output, target.field)[(0, *target.index)])


@pytest.mark.parametrize("baseline", ["zeros", "pad"])
def test_completeness_gap_shrinks_with_steps(pairs, baseline):
    """Sum of attributions -> f(x) - f(b) (forward passes): the trapezoid rule's error falls as
    1/steps**2 (at least 8x from 16 to 64 steps, 16x expected) and is under 1e-3 |f(x) - f(b)| at
    256 steps; Gauss-Legendre with 50 steps is within 1e-4."""
    model, _ = pairs["seq_cls"]
    target = AttributionTarget("logit of 2", "logits", (2,))
    embeds = np.asarray(model.embed_tokens(jnp.asarray(IDS)[None]))[0]
    reference = attribution.baseline_embeddings(model, IDS, baseline)
    expected = _direct_value(model, embeds, target) - _direct_value(model, reference, target)
    assert abs(expected) > 1e-2
    gaps = {}
    for steps in (16, 64, 256):
        (result,) = attribution.integrated_gradients(model, IDS, [target], token_type_ids=TYPES, baseline=baseline,
                                                     steps=steps, method="riemann_trapezoid")
        assert abs(result.delta - expected) <= 1e-5 * abs(expected)
        gaps[steps] = abs(result.total - expected)
    assert gaps[64] <= gaps[16] / 8, gaps
    assert gaps[256] <= 1e-3 * abs(expected), gaps
    (result,) = attribution.integrated_gradients(model, IDS, [target], token_type_ids=TYPES, baseline=baseline,
                                                 steps=50, method="gausslegendre")
    assert abs(result.gap) <= 1e-4 * abs(expected)


def test_chunking_does_not_change_the_result(pairs):
    """Path points in chunks of 7 (the last padded with zero-weight points) or all at once."""
    model, _ = pairs["token_cls"]
    target = AttributionTarget("tag 1 at 4", "logits", (4, 1))
    (whole,) = attribution.integrated_gradients(model, IDS, [target], token_type_ids=TYPES, steps=20, batch_size=20)
    (chunked,) = attribution.integrated_gradients(model, IDS, [target], token_type_ids=TYPES, steps=20, batch_size=7)
    _close(chunked.scores, whole.scores, tol=1e-5)


def test_gradient_x_input_is_the_gradient_times_the_embeddings(pairs):
    model, _ = pairs["seq_cls"]
    target = AttributionTarget("logit of 1", "logits", (1,))
    embeds = model.embed_tokens(jnp.asarray(IDS)[None])[0]
    gradient = jax.grad(lambda e: _direct_value_traced(model, e, target))(embeds)
    expected = np.asarray(jnp.sum(gradient * embeds, axis=-1))
    (result,) = attribution.gradient_x_input(model, IDS, [target], token_type_ids=TYPES)
    _close(result.scores, expected, tol=1e-5)
    assert result.value == pytest.approx(_direct_value(model, embeds, target), rel=1e-6)
    assert result.baseline_value == pytest.approx(_direct_value(model, np.zeros_like(embeds), target), rel=1e-6)


def _direct_value_traced(model, embeds, target):
    output = model(inputs_embeds=embeds[None], attention_mask=jnp.ones((1, len(IDS)), jnp.int32),
                   token_type_ids=jnp.asarray(TYPES)[None])
    return getattr(output, target.field)[(0, *target.index)]


def test_baseline_array_and_errors(pairs):
    model, _ = pairs["seq_cls"]
    target = AttributionTarget("logit of 0", "logits", (0,))
    pad = attribution.baseline_embeddings(model, IDS, "pad")
    np.testing.assert_array_equal(pad, np.asarray(model.embed_tokens(jnp.zeros((1, len(IDS)), jnp.int32)))[0])
    (named,) = attribution.integrated_gradients(model, IDS, [target], token_type_ids=TYPES, baseline="pad", steps=8)
    (given,) = attribution.integrated_gradients(model, IDS, [target], token_type_ids=TYPES, baseline=pad, steps=8)
    np.testing.assert_array_equal(named.scores, given.scores)
    with pytest.raises(ConfigError, match="baseline='mean': expected one of zeros, pad"):
        attribution.baseline_embeddings(model, IDS, "mean")
    with pytest.raises(ConfigError, match=r"baseline: an array must have the embeddings' shape \(10, 32\)"):
        attribution.baseline_embeddings(model, IDS, np.zeros((3, 32)))


# ----------------------------------------------------------------------------- against captum


@pytest.mark.parametrize("method,steps,baseline", [("gausslegendre", 32, "zeros"), ("riemann_middle", 24, "pad"),
                                                   ("gausslegendre", 16, "random")])
def test_seq_cls_equals_captum(pairs, method, steps, baseline):
    model, torch_model = pairs["seq_cls"]
    if baseline == "random":
        baseline = np.random.default_rng(0).normal(0, 0.5, (len(IDS), CONFIG.hidden_size)).astype(np.float32)
    for label in range(NUM_LABELS):
        target = AttributionTarget(f"logit of {label}", "logits", (label,))
        (ours,) = attribution.integrated_gradients(model, IDS, [target], token_type_ids=TYPES, baseline=baseline,
                                                   steps=steps, method=method, batch_size=8)
        _close(ours.scores, _captum(torch_model, "logits", label, baseline, steps, method))


def test_trapezoid_is_captums_rescaled(pairs):
    """captum's riemann_trapezoid weights sum to (n-1)/n: its attributions are ours times (n-1)/n."""
    model, torch_model = pairs["seq_cls"]
    n = 20
    (ours,) = attribution.integrated_gradients(model, IDS, [AttributionTarget("logit", "logits", (0,))],
                                               token_type_ids=TYPES, steps=n, method="riemann_trapezoid")
    _close(ours.scores * (n - 1) / n, _captum(torch_model, "logits", 0, "zeros", n, "riemann_trapezoid"))


def test_token_cls_equals_captum(pairs):
    model, torch_model = pairs["token_cls"]
    for position, tag in ((1, 0), (4, 2), (9, 1)):
        target = AttributionTarget(f"tag {tag} at {position}", "logits", (position, tag))
        (ours,) = attribution.integrated_gradients(model, IDS, [target], token_type_ids=TYPES, steps=32)
        _close(ours.scores, _captum(torch_model, "logits", (position, tag), "zeros", 32, "gausslegendre"))


def test_qa_start_and_end_equal_captum(pairs):
    model, torch_model = pairs["qa"]
    targets = [AttributionTarget("start at 7", "start_logits", (7,)), AttributionTarget("end at 8", "end_logits", (8,))]
    start, end = attribution.integrated_gradients(model, IDS, targets, token_type_ids=TYPES, baseline="pad", steps=32)
    _close(start.scores, _captum(torch_model, "start_logits", 7, "pad", 32, "gausslegendre"))
    _close(end.scores, _captum(torch_model, "end_logits", 8, "pad", 32, "gausslegendre"))
    assert start.target == "start at 7" and end.target == "end at 8"


# ----------------------------------------------------------------------------- the tasks' targets


def _output(model, ids=IDS, types=TYPES):
    return model(jnp.asarray(ids)[None], attention_mask=jnp.ones((1, len(ids)), jnp.int32),
                 token_type_ids=jnp.asarray(types)[None])


def test_seq_cls_targets_the_predicted_or_chosen_class_logit(pairs):
    model, _ = pairs["seq_cls"]
    task, names = tasks.get("seq_cls"), ["neg", "neutral", "pos"]
    output = _output(model)
    row = {"input_ids": IDS, "token_type_ids": TYPES}
    predicted = int(np.argmax(np.asarray(output.logits)[0]))
    (target,) = task.attribution_targets(output, row, label_names=names)
    assert target.field == "logits" and target.index == (predicted,) and names[predicted] in target.name
    assert task.attribution_targets(output, row, target="pos", label_names=names)[0].index == (2,)
    assert task.attribution_targets(output, row, target="1", label_names=names)[0].index == (1,)
    with pytest.raises(ConfigError, match="target='positive': expected one of neg, neutral, pos"):
        task.attribution_targets(output, row, target="positive", label_names=names)
    with pytest.raises(ConfigError, match="task seq_cls takes no position="):
        task.attribution_targets(output, row, position=3, label_names=names)
    prediction, probabilities = task.describe_prediction(output, row, [target], names)
    assert prediction == names[predicted]
    expected = np.asarray(jax.nn.softmax(output.logits[0]))
    assert [probabilities[n] for n in names] == pytest.approx(expected.tolist(), abs=1e-6)


def test_token_cls_targets_a_tag_at_a_position(pairs):
    model, _ = pairs["token_cls"]
    task = tasks.get("token_cls")
    output = _output(model)
    labels = np.full(len(IDS), -100)
    labels[[2, 5]] = 0
    row = {"input_ids": IDS, "labels": labels}
    (first,) = task.attribution_targets(output, row)
    assert first.index == (2, int(np.argmax(np.asarray(output.logits)[0, 2])))
    assert task.attribution_targets(output, row, position="6", target=1)[0].index == (6, 1)
    with pytest.raises(ConfigError, match=r"position=10: expected a token index 0-9"):
        task.attribution_targets(output, row, position=10)


def test_qa_targets_the_best_span_start_and_end(pairs):
    from flaxen.tasks.qa import best_span_tokens

    model, _ = pairs["qa"]
    task = tasks.get("qa")
    output = _output(model)
    offsets = np.full((len(IDS), 2), -1)
    offsets[6:9] = [[0, 3], [4, 8], [9, 12]]
    row = {"input_ids": IDS, "offsets": offsets, "context": "the red fox"}
    start, end = task.attribution_targets(output, row)
    best = best_span_tokens(np.asarray(output.start_logits)[0], np.asarray(output.end_logits)[0], offsets)
    assert (start.field, end.field) == ("start_logits", "end_logits")
    assert (start.index[0], end.index[0]) == best[:2] and 6 <= best[0] <= best[1] <= 8
    start, end = task.attribution_targets(output, row, span="6:8")
    assert (start.index, end.index) == ((6,), (8,))
    prediction, _ = task.describe_prediction(output, row, [start, end])
    assert prediction == "tokens 6-8: 'the red fox'"
    with pytest.raises(ConfigError, match="span='8:6': expected START:END"):
        task.attribution_targets(output, row, span="8:6")


def test_explain_rows_encode_as_training_does():
    """Raw text -> the row of the task's training encoder; options a task cannot use are refused."""
    from omegaconf import OmegaConf

    from flaxen.data import encoding
    from flaxen.tasks.qa import features

    tokenizer = _word_tokenizer()
    data_cfg = OmegaConf.create({"max_length": 12, "doc_stride": 4})
    row = tasks.get("seq_cls").explain_row(tokenizer, data_cfg, "w3 w4", "w5")
    expected = encoding.classification_row(tokenizer, {"text": "w3 w4", "text_pair": "w5", "label": 0}, 12, False)
    np.testing.assert_array_equal(row["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(row["token_type_ids"], expected["token_type_ids"])
    row = tasks.get("token_cls").explain_row(tokenizer, data_cfg, "w3 w4 w5")
    np.testing.assert_array_equal(row["input_ids"], [3, 4, 5])
    assert (row["labels"] != -100).sum() == 3
    row = tasks.get("qa").explain_row(tokenizer, data_cfg, "w3", context="w4 w5 w6")
    np.testing.assert_array_equal(row["input_ids"], features(tokenizer, {"question": "w3", "context": "w4 w5 w6",
                                                                         "answer_texts": ["w4"], "answer_starts": [0]},
                                                             12, 4)[0]["input_ids"])
    assert row["context"] == "w4 w5 w6"
    with pytest.raises(ConfigError, match="give the question as text=... and the passage as context="):
        tasks.get("qa").explain_row(tokenizer, data_cfg, "w3")
    with pytest.raises(ConfigError, match="task seq_cls takes no context="):
        tasks.get("seq_cls").explain_row(tokenizer, data_cfg, "w3", context="w4")
    with pytest.raises(ConfigError, match="task token_cls takes no text_pair="):
        tasks.get("token_cls").explain_row(tokenizer, data_cfg, "w3", "w4")
    with pytest.raises(ConfigError, match="task mlm has no attribution target"):
        tasks.get("mlm").explain_row(tokenizer, data_cfg, "w3")


def _word_tokenizer():
    """The tests' word-level tokenizer (tests/conftest.py): [PAD]=0, [MASK]=1, w2, w3, ..."""
    from conftest import _tokenizer

    return _tokenizer(50)


@pytest.mark.parametrize("name", ["mlm", "clm"])
def test_language_models_have_no_attribution_target(name):
    with pytest.raises(ConfigError, match=rf"task {name} has no attribution target.*; tasks that can be explained: qa, seq_cls, token_cls$"):
        tasks.get(name).attribution_targets(None, {})


# ----------------------------------------------------------------------------- scripts/explain.py


@pytest.fixture(scope="module")
def explain_script():
    spec = importlib.util.spec_from_file_location("flaxen_explain_script", os.path.join(ROOT, "scripts", "explain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_explain_writes_a_page_and_attention_maps(tmp_path, explain_script, in_memory_task_data):
    """A tiny trained run explained through the command: a standalone page with the escaped input,
    prediction, probabilities and completeness numbers; one PNG per layer."""
    from PIL import Image

    from flaxen import loop
    from tiny_runs import make_cfg

    run_dir = tmp_path / "run"
    loop.train(make_cfg(run_dir, steps=4, **{"model.num_layers": 2}), task_data=in_memory_task_data("seq_cls"))
    out = tmp_path / "explain"
    code = explain_script.main([f"run_dir={run_dir}", "text=w4 w7 w9 w12", "steps=16", "target=even",
                                f"out={out}", "eval_batch_size=4"])
    assert code == 0
    page = (out / "explain.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "src=" not in page
    assert "Attributions to the logit of &#x27;even&#x27;" in page
    for label in ("odd", "even"):
        assert f"<td>{label}</td>" in page
    for word in ("w4", "w7", "w9", "w12"):
        assert f">{word}</span>" in page
    assert "completeness gap" in page and "integrated gradients (gausslegendre, 16 steps, zeros baseline)" in page
    for layer in range(2):
        with Image.open(out / f"attention_layer{layer}.png") as image:
            assert image.size[0] > 200 and image.size[1] > 200
    assert not (out / "attention_layer2.png").exists()
    assert explain_script.main([f"run_dir={run_dir}", "text=w4", "steps=4", "layers=1", f"out={tmp_path / 'one'}"]) == 0
    assert sorted(os.listdir(tmp_path / "one")) == ["attention_layer1.png", "explain.html"]
    assert explain_script.main([f"run_dir={run_dir}", "text=w4", "layers=2"]) == 1


def test_explain_page_escapes_html(explain_script):
    class Run:
        run_dir, step = "runs/x", 3
        task = tasks.get("seq_cls")

    result = attribution.Attribution("logit of '<em>'", "integrated gradients", np.array([0.5, -1.0], np.float32),
                                     1.0, 1.5)
    page = explain_script.render_page(Run(), "<script>alert(1)</script> & co", None, None, ["<u>", "&amp"],
                                      "<em>", {"<em>": 0.7, "x": 0.3}, [result], [])
    assert "<script>" not in page and "<u>" not in page and "<em>" not in page
    assert html.escape("<script>alert(1)</script> & co") in page and ">&lt;u&gt;</span>" in page
    assert ">&amp;amp</span>" in page
    # normalised to max |a| = 1: +0.5 half-way to full red, -1.0 full blue
    assert 'background:rgb(255,159,159)" title="&lt;u&gt;: +0.5"' in page
    assert 'background:rgb(64,64,255)" title="&amp;amp: -1"' in page


@pytest.mark.parametrize("argv,message", [(["text=hello"], "run_dir= is missing"),
                                          (["run_dir=runs/x"], "text= is missing"),
                                          (["run_dir=runs/x", "hello"], "argument 'hello': expected key=value"),
                                          (["run_dir=runs/x", "text=hi", "steps=many"],
                                           "steps='many': expected an integer"),
                                          (["run_dir=runs/x", "text=hi", "layers=first"],
                                           "layers='first': expected layer indices separated by commas")])
def test_explain_command_errors(explain_script, capsys, argv, message):
    assert explain_script.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
