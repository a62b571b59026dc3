"""models.peft against PyTorch: Hugging Face PEFT-format export loaded by `peft`, merged LoRA loaded by transformers.

Reference: PyTorch `peft.PeftModel.from_pretrained(base, path)` on the base model directory the
flaxen model was loaded from, and `transformers` on the merged model saved by flaxen.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from flaxen.errors import ConfigError
from models import peft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch_peft = pytest.importorskip("peft")

IDS = np.random.RandomState(0).randint(0, 64, (2, 7))
MASK = np.ones((2, 7), np.int64)
MASK[1, 5:] = 0


def randomize(model, seed):
    """Random LoRA factors (B starts at zero) and a changed head: as if trained."""
    for i, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, peft.PeftParam))):
        variable.set_value(0.2 * jax.random.normal(jax.random.key(seed * 100 + i, impl="rbg"), variable.shape))
    if model.head is not None and getattr(model.head, "dense", None) is not None:
        kernel = model.head.dense.kernel
        kernel.set_value(kernel[...] + 0.3)


def flaxen_logits(model):
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)).logits)


def torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.float().numpy()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    path = tmp_path_factory.mktemp("bert") / "base"
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2") / "base"
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_lora(bert_dir):
    model = models.load_pretrained(bert_dir, head="seq_cls")
    config = {"name": "lora", "rank": 4, "alpha": 6, "target_modules": ["attention.*", "intermediate", "output"],
              "modules_to_save": ["pooler"]}
    peft.apply(model, config, rngs=nnx.Rngs(jax.random.key(1, impl="rbg")))
    randomize(model, 1)
    return model


def test_bert_lora_export_loads_in_pytorch_peft(bert_dir, bert_lora, tmp_path):
    path = peft.export_hf_peft(bert_lora, tmp_path / "adapter")
    base = transformers.BertForSequenceClassification.from_pretrained(bert_dir).eval()
    reference = torch_peft.PeftModel.from_pretrained(base, path).eval()
    np.testing.assert_allclose(flaxen_logits(bert_lora), torch_logits(reference), atol=1e-4, rtol=0)
    assert not np.allclose(torch_logits(transformers.BertForSequenceClassification.from_pretrained(bert_dir).eval()),
                           torch_logits(reference), atol=1e-3)


def test_merged_lora_saves_a_model_transformers_loads(bert_lora, tmp_path):
    merged = peft.merge(bert_lora)
    np.testing.assert_allclose(flaxen_logits(merged), flaxen_logits(bert_lora), atol=1e-5, rtol=0)
    path = models.save_pretrained(merged, tmp_path / "merged")
    reference = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    np.testing.assert_allclose(torch_logits(reference), flaxen_logits(bert_lora), atol=1e-4, rtol=0)


def test_bert_qa_lora_export_loads_in_pytorch_peft(bert_dir, tmp_path):
    """Extractive QA: the LoRA export (task_type QUESTION_ANS, qa_outputs saved in full) gives
    PyTorch peft's start and end logits."""
    model = models.load_pretrained(bert_dir, head="qa")
    peft.apply(model, {"name": "lora", "rank": 4, "alpha": 8, "target_modules": ["query", "value"]},
               rngs=nnx.Rngs(jax.random.key(2, impl="rbg")))
    randomize(model, 2)
    path = peft.export_hf_peft(model, tmp_path / "adapter")
    base = transformers.BertForQuestionAnswering.from_pretrained(bert_dir, num_labels=2).eval()
    reference = torch_peft.PeftModel.from_pretrained(base, path).eval()
    ours = model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
    np.testing.assert_allclose(np.asarray(ours.start_logits), theirs.start_logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.end_logits), theirs.end_logits.numpy(), atol=1e-4, rtol=0)


def test_gpt2_fused_attention_export_with_rslora(gpt2_dir, tmp_path):
    """q/v LoRA factors become one LoRA on GPT-2's fused c_attn (rank 2r, B block-structured)."""
    model = models.load_pretrained(gpt2_dir, head="causal_lm")
    peft.apply(model, {"name": "lora", "rank": 2, "alpha": 3, "rslora": True, "target_modules": ["query", "value",
                                                                                                  "intermediate"]},
               rngs=nnx.Rngs(jax.random.key(2, impl="rbg")))
    randomize(model, 2)
    path = peft.export_hf_peft(model, tmp_path / "adapter")
    base = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    reference = torch_peft.PeftModel.from_pretrained(base, path).eval()
    assert reference.peft_config["default"].rank_pattern
    got, expected = flaxen_logits(model), torch_logits(reference)
    np.testing.assert_allclose(got[0], expected[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1, :5], expected[1, :5], atol=1e-4, rtol=0)


def test_only_lora_exports(bert_dir, tmp_path):
    model = models.load_pretrained(bert_dir, head="seq_cls")
    peft.apply(model, {"name": "adapter", "size": 2})
    with pytest.raises(ConfigError, match="only LoRA"):
        peft.export_hf_peft(model, tmp_path / "adapter")
