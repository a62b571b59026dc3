"""flaxen's models: Flax NNX BERT-family encoders and GPT-2-family decoders with task heads.

Knows nothing about training and imports nothing from flaxen (errors: models.errors). Public surface:
    ModelConfig, Model, ModelOutput, build_model(config, head=None, num_labels=2, rngs=...)
    model(input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
          inputs_embeds=None, deterministic=True, dropout_rng=None, output_attentions=False,
          output_hidden_states=False) -> ModelOutput (last_hidden_state, pooler_output, logits,
          start_logits, end_logits, hidden_states, attentions; models.model says what each holds)
    model.embed_tokens(input_ids): the word embeddings that inputs_embeds replaces
    load_pretrained(path, head=None, **head_kwargs), save_pretrained(model, path)
    HEADS: the head names ('mlm', 'causal_lm', 'seq_cls', 'token_cls', 'qa'; what each needs is
    its models.heads.HEADS entry); FAMILIES: 'bert', 'roberta', 'gpt2', ...
    generate(model, input_ids, attention_mask=None, *, max_new_tokens, num_beams=1, ...): greedy,
          sampling or beam search for gpt2-family causal LMs and encoder-decoders (models.generation)
    minilm_path()
    family 't5': build_model(config, 'seq2seq_lm') -> models.t5.T5, an encoder-decoder called as
          model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, *, deterministic,
          dropout_rng) -> models.t5.Seq2SeqOutput (logits, encoder_last_hidden_state), with
          encode / init_cache / decode for generation and shift_right(labels) (models.t5 says how)
"""
from models.config import FAMILIES, ModelConfig
from models.generation import generate
from models.heads import NAMES as HEADS
from models.hf import load_pretrained, save_pretrained
from models.model import Model, ModelOutput, build_model
from models.pretrained import minilm_path

__all__ = [
    "FAMILIES",
    "HEADS",
    "ModelConfig",
    "Model",
    "ModelOutput",
    "build_model",
    "load_pretrained",
    "save_pretrained",
    "generate",
    "minilm_path",
]
