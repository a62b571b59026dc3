"""Prompt tuning and IA³ (models.peft.prompt, models.peft.ia3) against PyTorch `peft` and through training.

References: PyTorch `peft.PeftModel.from_pretrained(base, path)` on the base model directory
(transformers' own, as a flaxen user's base model saved by models.save_pretrained would be) loading
flaxen's Hugging Face PEFT export; the base model itself (IA³ starts at ones); the word embeddings
of the text's ids (prompt init); PyTorch peft's greedy `generate` (the prompt in the cache); an
uninterrupted run (resume).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import test_peft_hf
from tiny_runs import make_cfg

import models
from flaxen import checkpoint, config, loop, modeling
from flaxen.errors import ConfigError
from models import peft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch_peft = pytest.importorskip("peft")

IDS = np.random.RandomState(0).randint(0, 64, (2, 7))
MASK = np.ones((2, 7), np.int64)
MASK[1, 5:] = 0
TYPES = np.zeros((2, 7), np.int64)
TYPES[:, 4:] = 1
V = 3  # virtual tokens
PROMPT = {"name": "prompt", "num_virtual_tokens": V}
# PEFT's BERT default targets (key, value, output.dense: the attention output projection and the MLP
# output layer, both feed-forward) in flaxen's names
IA3_BERT = {"name": "ia3", "target_modules": ["key", "value", "attention.out", "output"],
            "feedforward_modules": ["attention.out", "output"]}
IA3_GPT2 = {"name": "ia3", "target_modules": ["query", "value", "intermediate", "output"]}


def rbg(seed):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def randomize(model, seed):
    """Random PEFT values (IA³ starts at ones) and a changed head: as if trained."""
    for i, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, peft.PeftParam))):
        noise = 0.3 * jax.random.normal(jax.random.key(seed * 100 + i, impl="rbg"), variable.shape)
        variable.set_value(variable[...] + noise)
    if model.head is not None and getattr(model.head, "dense", None) is not None:
        kernel = model.head.dense.kernel
        kernel.set_value(kernel[...] + 0.5 * jax.random.normal(jax.random.key(seed, impl="rbg"), kernel.shape))


def flaxen_logits(model, types=True):
    kwargs = {"token_type_ids": jnp.asarray(TYPES)} if types else {}
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK), **kwargs).logits)


def torch_logits(model, types=True):
    kwargs = {"token_type_ids": torch.tensor(TYPES)} if types else {}
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), **kwargs).logits.float().numpy()


# the tiny PyTorch base models (module fixtures), shared with test_peft_hf
bert_dir, gpt2_dir = test_peft_hf.bert_dir, test_peft_hf.gpt2_dir
BERT_CLASSES = {"seq_cls": "BertForSequenceClassification", "token_cls": "BertForTokenClassification"}


# ----------------------------------------------------------------------------- PyTorch peft round trips


@pytest.mark.parametrize("head", ["seq_cls", "token_cls"])
@pytest.mark.parametrize("method", ["prompt", "ia3"])
def test_bert_export_loads_in_pytorch_peft(bert_dir, tmp_path, head, method):
    """Padding and token types; seq_cls pools at the first virtual token (PEFT's [CLS] position);
    token_cls gives PEFT's logits at the real positions (PEFT returns the virtual ones first)."""
    model = models.load_pretrained(bert_dir, head=head, num_labels=3)
    settings = PROMPT if method == "prompt" else IA3_BERT
    if head == "seq_cls":
        settings = {**settings, "modules_to_save": ["pooler"]}
    peft.apply(model, settings, rngs=rbg(1))
    randomize(model, 1)
    path = peft.export_hf_peft(model, tmp_path / "adapter")
    base_class = getattr(transformers, BERT_CLASSES[head])
    reference = torch_peft.PeftModel.from_pretrained(base_class.from_pretrained(bert_dir, num_labels=3).eval(),
                                                     path).eval()
    theirs = torch_logits(reference)
    if head == "token_cls" and method == "prompt":
        assert theirs.shape[1] == V + IDS.shape[1]
        theirs = theirs[:, V:]
    ours = flaxen_logits(model)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    plain = torch_logits(base_class.from_pretrained(bert_dir, num_labels=3).eval())
    assert not np.allclose(plain, theirs, atol=1e-3)


@pytest.mark.parametrize("method", ["prompt", "ia3"])
def test_gpt2_causal_lm_export_loads_in_pytorch_peft(gpt2_dir, tmp_path, method):
    """IA³ on query and value becomes one vector on GPT-2's fused c_attn (ones for the keys)."""
    model = models.load_pretrained(gpt2_dir, head="causal_lm")
    peft.apply(model, PROMPT if method == "prompt" else IA3_GPT2, rngs=rbg(2))
    randomize(model, 2)
    path = peft.export_hf_peft(model, tmp_path / "adapter")
    reference = torch_peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval(),
                                                     path).eval()
    theirs = torch_logits(reference, types=False)
    theirs = theirs[:, theirs.shape[1] - IDS.shape[1]:]
    ours = flaxen_logits(model, types=False)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[1, :5], theirs[1, :5], atol=1e-4, rtol=0)  # before the right padding
    if method == "ia3":
        merged = peft.merge(model)
        np.testing.assert_allclose(flaxen_logits(merged, types=False), ours, atol=1e-5, rtol=0)
    else:
        prompt, new = IDS[:1, :5], 4
        generated = np.asarray(models.generate(model, prompt, max_new_tokens=new))
        with torch.no_grad():
            expected = reference.generate(input_ids=torch.tensor(prompt), attention_mask=torch.ones(1, 5, dtype=torch.long),
                                          max_new_tokens=new, do_sample=False).numpy()
        np.testing.assert_array_equal(generated, expected)


def test_ia3_merge_equals_the_unmerged_model_and_saves_for_transformers(bert_dir, tmp_path):
    model = models.load_pretrained(bert_dir, head="seq_cls", num_labels=3)
    peft.apply(model, IA3_BERT, rngs=rbg(3))
    randomize(model, 3)
    merged = peft.merge(model)
    assert not hasattr(merged, "peft_config") and not nnx.state(merged, peft.PeftParam)
    np.testing.assert_allclose(flaxen_logits(merged), flaxen_logits(model), atol=1e-5, rtol=0)
    path = models.save_pretrained(merged, tmp_path / "merged")
    reference = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    np.testing.assert_allclose(torch_logits(reference), flaxen_logits(model), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_ia3_starts_at_the_base_model(bert_dir, gpt2_dir, family):
    path, head, settings = (bert_dir, "seq_cls", IA3_BERT) if family == "bert" else (gpt2_dir, "causal_lm", IA3_GPT2)
    model = models.load_pretrained(path, head=head, **({"num_labels": 3} if family == "bert" else {}))
    expected = flaxen_logits(model, types=family == "bert")
    peft.apply(model, settings, rngs=rbg(0))
    np.testing.assert_array_equal(flaxen_logits(model, types=family == "bert"), expected)
    scales = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(model, peft.IA3Param))}
    if family == "bert":  # output scaling: [heads, head_dim] of key/value; feed-forward: the layer's input
        assert scales["backbone.layers.0.attention.key.ia3_scale"] == (2, 8)
        assert scales["backbone.layers.0.attention.out.ia3_scale"] == (2, 8)
        assert scales["backbone.layers.0.output.ia3_scale"] == (32,)
    else:
        assert scales["backbone.layers.0.intermediate.ia3_scale"] == (64,)  # not feed-forward: its output
        assert scales["backbone.layers.0.output.ia3_scale"] == (64,)
    counts = peft.parameter_counts(model)
    assert 0 < counts["trainable"] < counts["total"]


def test_prompt_init_from_text_is_the_embedding_of_its_ids(bert_dir):
    """Ids repeated (or cut) to num_virtual_tokens, as PEFT's TEXT init; a Hugging Face tokenizer's
    `input_ids` or a callable's list both work."""
    model = models.load_pretrained(bert_dir, head="seq_cls", num_labels=3)
    table = np.asarray(model.backbone.embeddings.word.embedding[...])
    text = {"name": "prompt", "num_virtual_tokens": 5, "prompt_tuning_init": "text",
            "prompt_tuning_init_text": "a b"}
    peft.apply(model, text, tokenizer=lambda t: {"input_ids": [2, 9, 4]})
    np.testing.assert_array_equal(np.asarray(model.backbone.prompt_embeddings[...]), table[[2, 9, 4, 2, 9]])
    short = models.load_pretrained(bert_dir, head="seq_cls", num_labels=3)
    peft.apply(short, {**text, "num_virtual_tokens": 2}, tokenizer=lambda t: [7, 8, 9])
    np.testing.assert_array_equal(np.asarray(short.backbone.prompt_embeddings[...]), table[[7, 8]])


def test_prompt_text_init_through_flaxen_uses_the_runs_tokenizer(tmp_path, in_memory_task_data):
    """modeling.build encodes the text as the run encodes a sentence; the abstract rebuild
    (eval.py, resume) needs no tokenizer."""
    task = in_memory_task_data("seq_cls")
    text = {"name": "prompt", "num_virtual_tokens": 4, "prompt_tuning_init": "text",
            "prompt_tuning_init_text": "w3 w5 w7"}
    cfg = make_cfg(tmp_path, peft=text)
    model, spec = modeling.build(cfg, task)
    table = np.asarray(model.backbone.embeddings.word.embedding[...])
    np.testing.assert_array_equal(np.asarray(model.backbone.prompt_embeddings[...]), table[[3, 5, 7, 3]])
    rebuilt = modeling.ModelSpec.from_dict(spec.to_dict()).build_abstract()
    assert rebuilt.backbone.prompt_embeddings.shape == (4, 16)


# ----------------------------------------------------------------------------- adapter checkpoints


@pytest.mark.parametrize("settings", [PROMPT, IA3_BERT], ids=["prompt", "ia3"])
def test_adapter_checkpoint_round_trip(bert_dir, tmp_path, settings):
    model = models.load_pretrained(bert_dir, head="token_cls", num_labels=3)
    peft.apply(model, {**settings, **({"prompt_tuning_init": "text", "prompt_tuning_init_text": "x"}
                                      if settings is PROMPT else {})}, tokenizer=lambda t: [5])
    randomize(model, 4)
    path = peft.save_adapter(model, tmp_path / "adapter")
    loaded = peft.load_adapter(models.load_pretrained(bert_dir, head="token_cls", num_labels=3), path)
    assert peft.config_of(loaded) == peft.config_of(model)
    np.testing.assert_array_equal(flaxen_logits(loaded), flaxen_logits(model))


# ----------------------------------------------------------------------------- training


def _arrays(run_dir, step):
    saved = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    out = saved.restore_arrays(step, items=("params", "rest"))
    saved.close()
    return out


@pytest.mark.parametrize("task_name, settings", [
    ("seq_cls", {"name": "prompt", "num_virtual_tokens": 4, "prompt_tuning_init": "text",
                 "prompt_tuning_init_text": "w2 w9"}),
    ("token_cls", {"name": "ia3"}),
], ids=["prompt-seq_cls", "ia3-token_cls"])
def test_training_trains_only_the_method_and_resumes_bitwise(tmp_path, in_memory_task_data, task_name, settings):
    task = in_memory_task_data(task_name)
    kwargs = {"peft": settings, "steps": 4, "eval_every": 4, "checkpoint_every": 2, "optimizer.lr": 3e-2}
    straight = loop.train(make_cfg(tmp_path / "straight", task_name, **kwargs), task_data=task)
    stopped = loop.train(make_cfg(tmp_path / "resumed", task_name, **kwargs), task_data=task,
                         should_stop=lambda step: step == 2)
    resumed = loop.train(make_cfg(tmp_path / "resumed", task_name, **kwargs), task_data=task)
    assert stopped == {"status": "interrupted", "steps": 2}
    assert straight["status"] == resumed["status"] == "completed"
    ours, reference = _arrays(tmp_path / "resumed", 4), _arrays(tmp_path / "straight", 4)
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(reference[key]), err_msg=".".join(key))
    first = _arrays(tmp_path / "straight", 2)
    leaf = "prompt_embeddings" if settings["name"] == "prompt" else "ia3_scale"
    trained = {k for k in ours if not np.array_equal(np.asarray(ours[k]), np.asarray(first[k]))}
    assert any(k[-1] == leaf for k in trained) and any(k[0] == "head" for k in trained)
    assert all(k[-1] == leaf or k[0] == "head" for k in trained), sorted(trained)
    assert straight["peft"]["name"] == settings["name"]
    assert resumed["final_eval"]["loss"] == straight["final_eval"]["loss"]


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("values, key", [
    ({"name": "prompt", "num_virtual_tokens": 0}, "peft.num_virtual_tokens"),
    ({"name": "prompt", "prompt_tuning_init": "vocab"}, "peft.prompt_tuning_init"),
    ({"name": "prompt", "prompt_tuning_init": "text"}, "peft.prompt_tuning_init_text"),
    ({"name": "prompt", "prompt_tuning_init_text": "hello"}, "peft.prompt_tuning_init_text"),
    ({"name": "prompt", "init_std": 0}, "peft.init_std"),
    ({"name": "prompt", "rank": 4}, "peft.rank"),
    ({"name": "ia3", "target_modules": []}, "peft.target_modules"),
    ({"name": "ia3", "feedforward": ["output"]}, "peft.feedforward"),
])
def test_bad_config_names_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        peft.from_dict(values)


def test_bad_uses_raise_one_clear_error(bert_dir, gpt2_dir, tmp_path):
    model = models.load_pretrained(bert_dir, head="seq_cls", num_labels=3)
    with pytest.raises(ConfigError, match=r"feedforward_modules.*'intermediate'.*must also be in peft\.target_modules"):
        peft.apply(model, {"name": "ia3", "feedforward_modules": ["intermediate"]})
    with pytest.raises(ConfigError, match=r"prompt_tuning_init='text' needs the run's tokenizer"):
        peft.apply(model, {"name": "prompt", "prompt_tuning_init": "text", "prompt_tuning_init_text": "hi"})
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        peft.apply(model, {"name": "prompt", "prompt_tuning_init": "text", "prompt_tuning_init_text": "hi"},
                   tokenizer=lambda t: [1000])
    peft.apply(model, {"name": "prompt", "num_virtual_tokens": 12})
    with pytest.raises(ConfigError, match=r"num_virtual_tokens=12: 12 virtual tokens \+ 7 input positions exceed"):
        flaxen_logits(model)
    with pytest.raises(ConfigError, match="prompts add computation"):
        peft.merge(model)
    gpt2 = models.load_pretrained(gpt2_dir, head="causal_lm")
    peft.apply(gpt2, {"name": "ia3", "target_modules": ["query", "value"], "feedforward_modules": ["query"]})
    with pytest.raises(ConfigError, match="c_attn fuses 3 flaxen layers"):
        peft.export_hf_peft(gpt2, tmp_path / "adapter")


def test_run_config_checks_for_prompt_tuning(tmp_path):
    text = {"name": "prompt", "prompt_tuning_init": "text", "prompt_tuning_init_text": "w2"}
    with pytest.raises(ConfigError, match=r"num_virtual_tokens=20: data\.max_length=16 \+ 20 virtual tokens exceeds"):
        config.validate(make_cfg(tmp_path, peft={"name": "prompt"}))
    with pytest.raises(ConfigError, match="prompt_tuning_init=text with init_from"):
        config.validate(make_cfg(tmp_path, peft={**text, "num_virtual_tokens": 4}, init_from=str(tmp_path)))
    for name in ("prompt", "ia3"):
        composed = config.compose(["experiment=quickstart_finetune", f"peft={name}", "run_dir=/tmp/x"])
        assert peft.from_dict(composed.peft).name == name
