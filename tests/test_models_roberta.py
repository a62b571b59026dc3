"""RoBERTa (family 'roberta': models.bert.RobertaEncoder + models/roberta_hf.py) against transformers.

The reference is PyTorch transformers in f32 on CPU: tiny randomly initialised RoBERTa models
(every parameter perturbed, so LayerNorm, bias and padding-row mappings are exercised) saved with
transformers' own save_pretrained, one per class, on a right-padded batch whose padding is the pad
token (id 1) with attention_mask 0, so RoBERTa's positions (pad_token_id + 1 onwards, padding at
pad_token_id) differ from BERT's. Then: flaxen's save_pretrained back into transformers, parameter
counts (tiny classes and configs/model/roberta_base.yaml), `model=roberta_base` in the training
config, and a few training steps of a tiny RoBERTa classifier.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from omegaconf import OmegaConf

import models
from flaxen.errors import ConfigError

torch.set_num_threads(1)
TOL = 1e-4
PAD = 1
NUM_LABELS = 3
CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "model")

CLASSES = {
    None: transformers.RobertaModel,
    "mlm": transformers.RobertaForMaskedLM,
    "seq_cls": transformers.RobertaForSequenceClassification,
    "token_cls": transformers.RobertaForTokenClassification,
    "qa": transformers.RobertaForQuestionAnswering,
}


def _config(head=None):
    return transformers.RobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=40, type_vocab_size=1, pad_token_id=PAD, bos_token_id=0, eos_token_id=2,
        layer_norm_eps=1e-5, num_labels=2 if head == "qa" else NUM_LABELS,
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
    """head -> (torch model, directory written by transformers' save_pretrained)."""
    out = {}
    for i, (head, cls) in enumerate(CLASSES.items()):
        torch_model = _perturbed(cls, _config(head), seed=i)
        path = tmp_path_factory.mktemp(f"roberta_{head}")
        torch_model.save_pretrained(path)
        out[head] = torch_model, str(path)
    return out


@pytest.fixture(scope="module")
def batch():
    """<s> ... </s> rows right-padded with the pad token (id 1); real tokens avoid 1."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, size=(3, 11)).astype(np.int64)
    ids[:, 0] = 0
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _flaxen(model, ids, mask):
    return model(np.asarray(ids, np.int32), attention_mask=np.asarray(mask, np.int32), output_hidden_states=True)


def _torch(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)


def _max_diff(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b.detach().numpy() if hasattr(b, "detach") else b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def _compare(head, ours, theirs):
    """Every output at every position, padding included (both sides number pad positions alike)."""
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for mine, reference in zip(ours.hidden_states, theirs.hidden_states):
        assert _max_diff(mine, reference) <= TOL
    if head is None:
        assert _max_diff(ours.last_hidden_state, theirs.last_hidden_state) <= TOL
        assert _max_diff(ours.pooler_output, theirs.pooler_output) <= TOL
    elif head == "qa":
        assert _max_diff(ours.start_logits, theirs.start_logits) <= TOL
        assert _max_diff(ours.end_logits, theirs.end_logits) <= TOL
    else:
        assert _max_diff(ours.logits, theirs.logits) <= TOL


def _params(model):
    return {path: np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _count(model):
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("head", list(CLASSES))
def test_parity_padded_batch_and_parameter_count(checkpoints, batch, head):
    torch_model, path = checkpoints[head]
    model = models.load_pretrained(path, head=head)
    assert model.config.family == "roberta" and model.config.type_vocab_size == 1
    ids, mask = batch
    _compare(head, _flaxen(model, ids, mask), _torch(torch_model, ids, mask))
    assert _count(model) == torch_model.num_parameters()


def test_positions_start_after_the_pad_id_and_inputs_embeds_match(checkpoints, batch):
    """Positions come from input_ids (padding at pad_token_id, the rest from pad_token_id + 1);
    inputs_embeds numbers every position from pad_token_id + 1, as transformers does."""
    torch_model, path = checkpoints[None]
    model = models.load_pretrained(path)
    ids, mask = batch
    positions = np.asarray(model.backbone.default_position_ids(np.asarray(ids, np.int32), *ids.shape))
    expected = transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(
        torch.tensor(ids), PAD)
    np.testing.assert_array_equal(positions, expected.numpy())
    assert positions[2].tolist() == [2, 3, 4, 5] + [PAD] * 7

    embeds = model.embed_tokens(np.asarray(ids, np.int32))
    ours = model(inputs_embeds=embeds, attention_mask=np.asarray(mask, np.int32))
    with torch.no_grad():
        theirs = torch_model(inputs_embeds=torch.tensor(np.asarray(embeds)), attention_mask=torch.tensor(mask))
    assert _max_diff(ours.last_hidden_state, theirs.last_hidden_state) <= TOL
    # the type 1 of a pair template reads as RoBERTa's one token type
    typed = model(np.asarray(ids, np.int32), attention_mask=np.asarray(mask, np.int32),
                  token_type_ids=np.ones(ids.shape, np.int32))
    assert _max_diff(typed.last_hidden_state, _torch(torch_model, ids, mask).last_hidden_state) <= TOL


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("head", ["mlm", "seq_cls", "token_cls"])
def test_save_then_pytorch_and_flaxen_reload(checkpoints, batch, tmp_path, head):
    torch_model, path = checkpoints[head]
    model = models.load_pretrained(path, head=head)
    saved = models.save_pretrained(model, tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["model_type"] == "roberta" and written["architectures"] == [CLASSES[head].__name__]
    assert (written["pad_token_id"], written["bos_token_id"], written["eos_token_id"]) == (PAD, 0, 2)

    reloaded, info = CLASSES[head].from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = batch
    _compare(head, _flaxen(model, ids, mask), _torch(reloaded.eval(), ids, mask))

    again = models.load_pretrained(saved, head=head)
    first, second = _params(model), _params(again)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[key], second[key]) for key in first)
    assert again.config == model.config


def test_fresh_classifier_on_a_bare_checkpoint_has_no_pooler(checkpoints, batch, tmp_path):
    """RobertaForSequenceClassification's head replaces the pooler: loading the bare model for
    seq_cls builds no pooler, initialises classifier.dense and classifier.out_proj, and saves a
    directory transformers loads whole."""
    model = models.load_pretrained(checkpoints[None][1], head="seq_cls", num_labels=2)
    names = {".".join(map(str, path)) for path in _params(model)}
    assert not [n for n in names if "pooler" in n]
    assert {"head.dense.kernel", "head.dense.bias", "head.out_proj.kernel", "head.out_proj.bias"} <= names
    saved = models.save_pretrained(model, tmp_path / "cls")
    reloaded, info = transformers.RobertaForSequenceClassification.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = batch
    _compare("seq_cls", _flaxen(model, ids, mask), _torch(reloaded.eval(), ids, mask))


# ----------------------------------------------------------------------------- sizes and training


def _yaml_config(name):
    values = OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIG_DIR, f"{name}.yaml")))
    return models.ModelConfig.from_dict(values)


def test_roberta_base_parameter_count_equals_transformers():
    config = _yaml_config("roberta_base")
    assert (config.family, config.vocab_size, config.max_position_embeddings, config.type_vocab_size,
            config.pad_token_id, config.layer_norm_eps) == ("roberta", 50265, 514, 1, 1, 1e-5)
    reference_config = transformers.RobertaConfig(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
    with torch.device("meta"):
        reference = transformers.RobertaModel(reference_config)
    abstract = nnx.eval_shape(lambda: models.Model(config, rngs=nnx.Rngs(0)))
    assert _count(abstract) == reference.num_parameters() == 124_645_632


def test_roberta_base_in_the_training_config_and_a_tiny_roberta_trains(tmp_path, in_memory_task_data):
    from flaxen import config, loop
    from tiny_runs import make_cfg

    cfg = config.compose(["experiment=bert_mini_scratch_sst2", "model=roberta_base", "run_dir=/tmp/x"])
    assert (cfg.model.name, cfg.model.family, cfg.model.max_position_embeddings) == ("roberta_base", "roberta", 514)

    tiny = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIG_DIR, "roberta_tiny.yaml"))).items()
            if k in ("family", "type_vocab_size", "layer_norm_eps")}
    cfg = make_cfg(tmp_path, "seq_cls", steps=3, eval_every=0, eval_split=None, checkpoint_every=0, log_every=1,
                   **{"schedule.warmup_steps": 1, **{f"model.{k}": v for k, v in tiny.items()}})
    results = loop.train(cfg, task_data=in_memory_task_data("seq_cls"))
    assert json.loads((tmp_path / "model.json").read_text())["config"]["family"] == "roberta"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and np.isfinite(losses).all() and results["steps"] == 3


def test_pad_id_beyond_the_position_table_is_a_config_error():
    config = models.ModelConfig(family="roberta", vocab_size=99, hidden_size=32, num_layers=1, num_heads=4,
                                intermediate_size=37, max_position_embeddings=40, type_vocab_size=1, pad_token_id=50)
    with pytest.raises(ConfigError, match=r"model.pad_token_id=50: .*max_position_embeddings > 51 \(got 40\)"):
        models.build_model(config)
