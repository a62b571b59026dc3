"""Weight-only quantization (models.quant) and QLoRA (peft.base_quantization).

References are independent of the code under test: scales and codes are checked against their
definitions in numpy, the NF4 table against bitsandbytes' table and its construction from normal
quantiles (scipy), the quantized models against float models whose kernels are set to numpy's own
dequantization of the stored codes, and QLoRA training against its own uninterrupted run."""
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_runs
from flaxen import checkpoint, loop
from models import ModelConfig, build_model, peft, quant
from models.errors import ConfigError
from models.layers import Dense

F32_EPS = np.finfo(np.float32).eps
# bitsandbytes functional.py, get_4bit_type("nf4") (the QLoRA paper's NF4 data type)
BITSANDBYTES_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0]


def tiny(family="bert", hidden=32, intermediate=64, layers=2):
    return ModelConfig(family=family, vocab_size=96, hidden_size=hidden, num_layers=layers, num_heads=2,
                       intermediate_size=intermediate, max_position_embeddings=32, hidden_dropout=0.1,
                       attention_dropout=0.1)


def build(config, head, seed=0):
    """build_model's model, initialised as one jitted program (eagerly, each shape compiles)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(config, head, 2, seed=seed)))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(build_model(config, head, 2, seed=seed)))())


def ids(batch=2, seq=8):
    return jax.random.randint(jax.random.key(7), (batch, seq), 1, 96)


def unpack_numpy(packed):
    packed = np.asarray(packed)
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def numpy_kernel(layer):
    """The dequantized kernel [*in, *out] of a QuantizedDense, from its codes and scales by the
    scheme's definition."""
    q, s = np.asarray(layer.qvalue[...]), np.asarray(layer.scale[...], np.float32)
    if layer.scheme == "int8":
        return q.astype(np.float32) * s
    codes = unpack_numpy(q)
    values = codes.astype(np.float32) - 8 if layer.scheme == "int4" else np.asarray(BITSANDBYTES_NF4, np.float32)[codes]
    groups = s.shape[1]
    rows = (values.reshape(values.shape[0], groups, -1) * s[:, :, None]).reshape(values.shape)
    return rows.T.reshape(tuple(layer.in_shape) + tuple(layer.out_shape))


def with_kernels(model, layers):
    """A copy of float `model` whose block kernels (and word table) are numpy's dequantization of `layers`."""
    plain = nnx.clone(model)
    for path, layer in layers:
        node = plain
        for key in path:
            node = node[key] if isinstance(key, int) else getattr(node, key)
        if isinstance(layer, quant.QuantizedEmbed):
            q, s = np.asarray(layer.qvalue[...]), np.asarray(layer.scale[...])
            if layer.scheme == "int8":
                table = q.astype(np.float32) * s[:, None]
            else:
                codes = unpack_numpy(q)
                values = codes.astype(np.float32) - 8 if layer.scheme == "int4" else \
                    np.asarray(BITSANDBYTES_NF4, np.float32)[codes]
                table = (values.reshape(values.shape[0], s.shape[1], -1) * s[:, :, None]).reshape(values.shape)
            node.embedding.set_value(jnp.asarray(table))
        else:
            node.kernel.set_value(jnp.asarray(numpy_kernel(layer)))
    return plain


# --- schemes -------------------------------------------------------------------------------------

def random_dense(shape_in, shape_out, seed=0):
    dense = Dense(shape_in, shape_out, (None,) * (len(np.atleast_1d(shape_in)) + len(np.atleast_1d(shape_out))),
                  rngs=nnx.Rngs(seed))
    w = np.random.default_rng(seed).standard_normal(dense.kernel.shape).astype(np.float32)
    w[..., 0] = 0.0  # an all-zero output channel
    dense.kernel.set_value(jnp.asarray(w))
    return dense, w


def test_int8_per_channel_scale_and_error_bound():
    dense, w = random_dense(48, (3, 5))
    layer = quant.QuantizedDense(dense, "int8", None)
    q, s = np.asarray(layer.qvalue[...]), np.asarray(layer.scale[...])
    assert q.dtype == np.int8 and q.shape == w.shape and s.shape == (3, 5)
    absmax = np.abs(w).max(axis=0)
    np.testing.assert_allclose(s, np.where(absmax > 0, absmax / 127, 1.0), rtol=F32_EPS)
    assert np.abs(q).max() <= 127
    error = np.abs(w - numpy_kernel(layer))
    assert np.all(error <= s / 2 + F32_EPS * np.abs(w))
    assert np.all(error[..., 0] == 0)
    np.testing.assert_array_equal(np.asarray(layer.kernel_value()), numpy_kernel(layer))


@pytest.mark.parametrize("group", [16, 128])
def test_int4_group_scale_and_error_bound(group):
    dense, w = random_dense((4, 32), 6, seed=1)  # fan_in 128 over two input axes
    layer = quant.QuantizedDense(dense, "int4", group)
    rows = w.reshape(128, 6).T
    q, s = np.asarray(layer.qvalue[...]), np.asarray(layer.scale[...])
    assert q.dtype == np.uint8 and q.shape == (6, 64) and s.shape == (6, 128 // group)
    absmax = np.abs(rows.reshape(6, 128 // group, group)).max(axis=2)
    np.testing.assert_allclose(s, np.where(absmax > 0, absmax / 7, 1.0), rtol=F32_EPS)
    codes = unpack_numpy(q)
    assert codes.min() >= 1 and codes.max() <= 15  # q + 8 with q in [-7, 7]
    dequantized = numpy_kernel(layer)
    error = np.abs(rows - dequantized.reshape(128, 6).T).reshape(6, 128 // group, group)
    assert np.all(error <= s[:, :, None] / 2 + F32_EPS * np.abs(rows).reshape(error.shape))
    np.testing.assert_array_equal(np.asarray(layer.kernel_value()), dequantized)


def test_packing_round_trip_is_exact():
    codes = np.random.default_rng(2).integers(0, 16, (5, 3, 18), dtype=np.uint8)
    packed = np.asarray(quant.pack_int4(jnp.asarray(codes)))
    assert packed.dtype == np.uint8 and packed.shape == (5, 3, 9)
    np.testing.assert_array_equal(packed, codes[..., 0::2] | (codes[..., 1::2] << 4))
    np.testing.assert_array_equal(np.asarray(quant.unpack_int4(jnp.asarray(packed))), codes)
    every_byte = np.arange(256, dtype=np.uint8)[None]
    np.testing.assert_array_equal(np.asarray(quant.pack_int4(quant.unpack_int4(jnp.asarray(every_byte)))), every_byte)


def test_nf4_codebook_is_the_qlora_table():
    np.testing.assert_array_equal(quant.NF4_CODEBOOK, np.asarray(BITSANDBYTES_NF4, np.float32))
    torch = pytest.importorskip("torch")
    norm = pytest.importorskip("scipy.stats").norm
    # bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True)
    positive = norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1]).tolist()
    negative = (-norm.ppf(torch.linspace(0.9677083, 0.5, 8)[:-1])).tolist()
    values = torch.tensor(sorted(positive + [0.0] + negative))
    np.testing.assert_array_equal(quant.NF4_CODEBOOK, (values / values.max()).numpy())


def test_nf4_picks_the_nearest_code_per_block():
    dense, w = random_dense(128, 4, seed=3)
    layer = quant.QuantizedDense(dense, "nf4", None)
    assert layer.group_size == 64
    rows = w.reshape(128, 4).T.reshape(4, 2, 64)
    s = np.asarray(layer.scale[...])
    np.testing.assert_array_equal(s, np.where(np.abs(rows).max(axis=2) > 0, np.abs(rows).max(axis=2), 1.0))
    codes = unpack_numpy(layer.qvalue[...]).reshape(4, 2, 64)
    book = np.asarray(BITSANDBYTES_NF4, np.float32)
    x = rows / s[:, :, None]
    chosen = np.abs(x - book[codes])
    assert np.all(chosen <= np.abs(x[..., None] - book).min(axis=-1) + F32_EPS)
    half_gap = np.diff(book).max() / 2
    error = np.abs(rows - numpy_kernel(layer).reshape(128, 4).T.reshape(4, 2, 64))
    assert np.all(error <= s[:, :, None] * (half_gap + F32_EPS))


def test_bad_schemes_and_group_sizes_name_the_setting():
    dense, _ = random_dense(48, 8)
    with pytest.raises(ConfigError, match="scheme='int3'"):
        quant.QuantConfig("int3")
    with pytest.raises(ConfigError, match="per output channel"):
        quant.QuantConfig("int8", 64)
    with pytest.raises(ConfigError, match="even integer"):
        quant.QuantConfig("int4", 7)
    with pytest.raises(ConfigError, match="does not divide the input size 48 of layers.0.output"):
        quant.QuantizedDense(dense, "int4", 32, "layers.0.output")


# --- quantized models ----------------------------------------------------------------------------

CASES = [("bert", "seq_cls", "int8", False), ("bert", "seq_cls", "nf4", True), ("gpt2", "causal_lm", "int4", True)]


@pytest.mark.parametrize("family,head,scheme,embeddings", CASES)
def test_quantized_forward_equals_the_float_model_with_dequantized_weights(family, head, scheme, embeddings):
    model = build(tiny(family), head, seed=1)
    small = quant.quantize(model, scheme, 16 if scheme != "int8" else None, embeddings=embeddings)
    layers = quant.quantized_layers(small)
    assert len(layers) == 2 * 6 + embeddings
    assert all(type(layer.qvalue) is type(layer.scale) is quant.QuantizedWeight for _, layer in layers)
    reference = with_kernels(model, layers)
    forward = nnx.jit(lambda m, x: m(x).logits)
    np.testing.assert_allclose(forward(small, ids()), forward(reference, ids()), atol=1e-5, rtol=0)
    np.testing.assert_allclose(forward(quant.dequantize(small), ids()), forward(reference, ids()), atol=1e-5, rtol=0)
    assert isinstance(model.backbone.layers[0].intermediate, Dense)  # the float model is left as it was


def test_save_load_round_trip_is_exact(tmp_path):
    small = quant.quantize(build(tiny(), "seq_cls", seed=2), "int4", 16, embeddings=True)
    quant.save_quantized(small, tmp_path / "q", extra={"label_names": ["neg", "pos"]})
    loaded = quant.load_quantized(tmp_path / "q")
    ours = {p: np.asarray(v[...]) for p, v in nnx.iter_graph(small) if isinstance(v, nnx.Variable)}
    theirs = {p: np.asarray(v[...]) for p, v in nnx.iter_graph(loaded) if isinstance(v, nnx.Variable)}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=str(key))
    forward = nnx.jit(lambda m, x: m(x).logits)
    np.testing.assert_array_equal(forward(small, ids()), forward(loaded, ids()))
    description = json.load(open(tmp_path / "q" / quant.CONFIG_FILE))
    assert description["scheme"]["scheme"] == "int4" and description["extra"] == {"label_names": ["neg", "pos"]}
    assert description["layers"]["backbone.layers.1.attention.out"] == {
        "kind": "dense", "in_shape": [2, 16], "out_shape": [32], "group_size": 16}


def safetensors_sizes(path):
    """{tensor name: bytes} from a safetensors file's header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_kernels_on_disk_take_a_quarter_or_an_eighth_of_float32(tmp_path):
    model = build(tiny(hidden=128, intermediate=256, layers=1), "seq_cls")
    kernels = sum(4 * dense.kernel[...].size for _, dense in quant.block_dense_layers(model))
    # int8: 1 byte per weight + a 4-byte scale per output channel (fan_in >= 128); int4: half a byte
    # + a scale per group of 128; nf4: per block of 64
    for scheme, low, high in [("int8", 1 / 4, 1 / 4 + 1 / 128), ("int4", 1 / 8, 1 / 8 + 1 / 128),
                              ("nf4", 1 / 8, 1 / 8 + 1 / 64)]:
        small = quant.quantize(model, scheme)
        quant.save_quantized(small, tmp_path / scheme)
        sizes = safetensors_sizes(tmp_path / scheme / quant.WEIGHTS_FILE)
        names = {".".join(map(str, path)) + suffix for path, _ in quant.quantized_layers(small)
                 for suffix in (".qvalue", ".scale")}
        stored = sum(sizes[name] for name in names)
        assert low <= stored / kernels <= high, (scheme, stored / kernels)
        assert os.path.getsize(tmp_path / scheme / quant.WEIGHTS_FILE) < sum(sizes.values()) + 16384


# --- QLoRA ---------------------------------------------------------------------------------------

LORA = {"name": "lora", "rank": 2, "alpha": 4, "dropout": 0.1, "target_modules": ["query", "value", "output"]}


def nonzero_lora(model, seed=5):
    rng = np.random.default_rng(seed)
    for _, layer in peft.lora.lora_layers(model):
        layer.lora_b.set_value(jnp.asarray(0.1 * rng.standard_normal(layer.lora_b.shape), jnp.float32))
    return model


def test_lora_on_a_quantized_base_equals_lora_on_the_dequantized_weights(scheme="nf4"):
    config = tiny(layers=1)
    qlora = nonzero_lora(peft.apply(build(config, "seq_cls", seed=3),
                                    {**LORA, "base_quantization": scheme}, seed=4))
    assert isinstance(qlora.backbone.layers[0].attention.query, peft.QLoRADense)
    assert isinstance(qlora.backbone.layers[0].attention.key, quant.QuantizedDense)
    reference = nonzero_lora(peft.apply(build(config, "seq_cls", seed=3), LORA, seed=4))
    reference = with_kernels(reference, quant.quantized_layers(qlora))
    forward = nnx.jit(lambda m, x, rng: (m(x).logits, m(x, deterministic=False, dropout_rng=rng).logits))
    ours, theirs = forward(qlora, ids(), jax.random.key(9)), forward(reference, ids(), jax.random.key(9))
    for a, b in zip(ours, theirs):  # without and with dropout (LoRA's own dropout stream included)
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(forward(peft.merge(qlora), ids(), jax.random.key(9))[0], ours[0], atol=1e-5, rtol=0)

    trainable = peft.trainable_filter(qlora)
    _, params, rest = nnx.split(qlora, trainable, ...)
    names = {tuple(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert all(p[-1] in ("lora_a", "lora_b") or p[0] == "head" for p in names)
    frozen = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(rest)}
    stored = {p: v for p, v in frozen.items() if p[-1] == "qvalue"}
    assert len(stored) == 6 and {v.dtype for v in stored.values()} == {np.dtype("uint8")}
    counts, float_counts = peft.parameter_counts(qlora), peft.parameter_counts(reference)
    assert counts == float_counts


def test_qlora_settings_are_checked():
    with pytest.raises(ConfigError, match="peft.base_quantization='int3'"):
        peft.from_dict({**LORA, "base_quantization": "int3"})
    with pytest.raises(ConfigError, match="peft.base_quantization_group_size=64"):
        peft.from_dict({**LORA, "base_quantization": "int8", "base_quantization_group_size": 64})
    with pytest.raises(ConfigError, match="peft.base_quantization_group_size=3"):
        peft.from_dict({**LORA, "base_quantization": "nf4", "base_quantization_group_size": 3})
    keep = peft.apply(build(tiny(), "seq_cls"), {**LORA, "base_quantization": "int8",
                                                  "modules_to_save": ["layers.1.output"]})
    assert isinstance(keep.backbone.layers[1].output, Dense)
    assert isinstance(keep.backbone.layers[0].output, peft.QLoRADense)
    assert keep.backbone.layers[0].output.qvalue[...].dtype == jnp.int8


QLORA = {**LORA, "base_quantization": "nf4"}


@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory, in_memory_task_data):
    task = in_memory_task_data("seq_cls")
    base = tmp_path_factory.mktemp("qlora")
    cfg = lambda run_dir: tiny_runs.make_cfg(run_dir, peft=QLORA, eval_every=0)  # noqa: E731
    straight = loop.train(cfg(base / "straight"), task_data=task)
    stopped = loop.train(cfg(base / "resumed"), task_data=task, should_stop=lambda step: step == 4)
    resumed = loop.train(cfg(base / "resumed"), task_data=task)
    return base, straight, stopped, resumed


def restore(run_dir, step, items):
    saved = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    try:
        return saved.restore_arrays(step, items=items)
    finally:
        saved.close()


def test_qlora_trains_through_the_loop_and_resumes_bitwise(qlora_runs):
    base, straight, stopped, resumed = qlora_runs
    assert straight["status"] == "completed" and stopped == {"status": "interrupted", "steps": 4}
    assert resumed["status"] == "completed"
    first, last = restore(base / "straight", 4, ("rest",)), restore(base / "straight", 8, ("rest",))
    codes = {k: v for k, v in last.items() if k[-1] == "qvalue"}
    assert codes and {np.asarray(v).dtype for v in codes.values()} == {np.dtype("uint8")}
    assert not any(k[-1] == "kernel" and "layers" in k for k in last)  # the base is held quantized only
    for key in last:  # the frozen quantized base does not move
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(last[key]), err_msg=".".join(key))
    ours, reference = restore(base / "resumed", 8, ("params", "rest")), restore(base / "straight", 8, ("params", "rest"))
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(reference[key]), err_msg=".".join(key))
    params = restore(base / "straight", 8, ("params",))
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in params.items() if k[-1] == "lora_b")
    spec = json.load(open(base / "straight" / "model.json"))
    assert spec["peft"]["base_quantization"] == "nf4"


def test_a_lora_run_saved_before_base_quantization_existed_resumes(tmp_path):
    old = tiny_runs.make_cfg(tmp_path, peft=LORA)
    new = tiny_runs.make_cfg(tmp_path, peft={**LORA, "base_quantization": "none", "base_quantization_group_size": 0})
    assert loop._config_changes(old, new) == {}
    quantized = tiny_runs.make_cfg(tmp_path, peft=QLORA)
    assert loop._config_changes(old, quantized) == {"peft.base_quantization": (None, "nf4")}
