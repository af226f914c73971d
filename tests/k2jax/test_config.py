"""K2Config: HF config parsing in both rope forms, presets, validation, and the full model's size."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import k2jax
from k2jax.config import ConfigError, K2Config
from k2jax.loading import abstract_model

KIMI_K2_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 64, "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384,
    "routed_scaling_factor": 2.827, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-5,
    "bos_token_id": 163584, "eos_token_id": 163585, "tie_word_embeddings": False, "rope_theta": 50000.0,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "num_nextn_predict_layers": 0, "attention_bias": False,
    "quantization_config": K2Config().to_hf_dict()["quantization_config"],
}


def test_kimi_config_parses_to_the_preset():
    cfg = K2Config.from_dict(KIMI_K2_CONFIG)
    assert cfg == dataclasses.replace(k2jax.preset("kimi_k2_thinking"), rms_norm_eps=1e-5)
    assert math.isclose(cfg.softmax_scale, 192**-0.5 * (0.1 * math.log(64) + 1) ** 2)
    assert cfg.cache_lanes == 640


def test_rope_parameters_form_equals_rope_scaling_form():
    new = {k: v for k, v in KIMI_K2_CONFIG.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = {**KIMI_K2_CONFIG["rope_scaling"], "rope_type": "yarn", "rope_theta": 50000.0}
    del new["rope_parameters"]["type"]
    assert K2Config.from_dict(new) == K2Config.from_dict(KIMI_K2_CONFIG)


def test_hf_dict_round_trip():
    for name in ("kimi_k2_thinking", "small", "tiny"):
        cfg = k2jax.preset(name)
        assert K2Config.from_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("field, value, message", [
    ("kv_lora_rank", 0, "kv_lora_rank must be a positive integer"),
    ("num_experts_per_tok", 400, "num_experts_per_tok=400 exceeds n_routed_experts=384"),
    ("n_group", 5, "not divisible by n_group=5"),
    ("topk_group", 2, "topk_group=2 exceeds n_group=1"),
    ("qk_rope_head_dim", 63, "qk_rope_head_dim must be even"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("scoring_func", "softmax", "scoring_func='softmax' is not supported"),
    ("first_k_dense_replace", 62, "first_k_dense_replace must be in"),
])
def test_bad_fields_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        K2Config.from_dict({**KIMI_K2_CONFIG, field: value}, source="ckpt/config.json")


@pytest.mark.parametrize("field, value, message", [
    ("rope_theta", -1, "rope_theta must be a finite number in \\(0, inf\\), got -1"),
    ("routed_scaling_factor", float("nan"), "routed_scaling_factor must be a finite number in \\(0, inf\\), got nan"),
    ("routed_scaling_factor", float("inf"), "routed_scaling_factor must be a finite number"),
    ("rms_norm_eps", 0.0, "rms_norm_eps must be a finite number in \\(0, 1\\)"),
    ("rms_norm_eps", 2.0, "rms_norm_eps must be a finite number in \\(0, 1\\)"),
    ("rope_theta", "50000", "rope_theta must be a finite number"),
    ("norm_topk_prob", "yes", "norm_topk_prob must be true or false"),
    ("eos_token_id", 163840, "eos_token_id must be a token id in \\[0, vocab_size=163840\\)"),
    ("n_shared_experts", 1.5, "n_shared_experts must be an integer"),
    ("rope_scaling", {**KIMI_K2_CONFIG["rope_scaling"], "factor": -64.0}, "rope_scaling.factor must be a finite"),
    ("rope_scaling", {**KIMI_K2_CONFIG["rope_scaling"], "beta_fast": float("inf")}, "rope_scaling.beta_fast must"),
    ("rope_scaling", {**KIMI_K2_CONFIG["rope_scaling"], "mscale_all_dim": -1.0}, "rope_scaling.mscale_all_dim must"),
    ("rope_scaling", {**KIMI_K2_CONFIG["rope_scaling"], "original_max_position_embeddings": 0},
     "rope_scaling.original_max_position_embeddings must be a positive integer"),
    ("rope_scaling", "yarn", "rope_scaling must be an object or null"),
])
def test_numeric_ranges_are_named(field, value, message):
    with pytest.raises(ConfigError, match=f"^ckpt/config.json: {message}"):
        K2Config.from_dict({**KIMI_K2_CONFIG, field: value}, source="ckpt/config.json")


@pytest.mark.parametrize("text, message", [
    ('"rope_theta": -1', "rope_theta must be a finite number"),
    ('"routed_scaling_factor": NaN', "routed_scaling_factor must be a finite number"),
])
def test_k2jax_load_refuses_out_of_range_config(tmp_path, text, message):
    bundled = Path(k2jax.__file__).parent / "bundled"
    ckpt = Path(shutil.copytree(bundled, tmp_path / "ckpt"))
    raw = json.loads((bundled / "config.json").read_text())
    key = text.split('"')[1]
    (ckpt / "config.json").write_text(json.dumps(raw).replace(f'"{key}": {json.dumps(raw[key])}', text))
    with pytest.raises(ConfigError, match=f"{ckpt / 'config.json'}: {message}"):
        k2jax.load(ckpt)


@pytest.mark.parametrize("key, value", [("group_size", 128), ("num_bits", 8), ("symmetric", False)])
def test_unsupported_quantization_is_named(key, value):
    qc = K2Config().to_hf_dict()["quantization_config"]
    qc["config_groups"]["group_0"]["weights"][key] = value
    with pytest.raises(ConfigError, match=f"weights.{key}="):
        K2Config.from_dict({**KIMI_K2_CONFIG, "quantization_config": qc})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        K2Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        K2Config.from_json(tmp_path)


def test_full_model_size():
    """1,026.4 B parameters (INT4 experts count 2 per byte), 594 GB in native format."""
    _, state = abstract_model(k2jax.preset("kimi_k2_thinking"))
    params = nbytes = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        n = int(np.prod(leaf.shape))
        nbytes += n * leaf.dtype.itemsize
        is_packed = "packed" in jax.tree_util.keystr(path)
        params += 2 * n if is_packed else (0 if "scale" in jax.tree_util.keystr(path) else n)
    assert abs(params / 1026.4e9 - 1) < 1e-3, params
    assert abs(nbytes / 594e9 - 1) < 1e-2, nbytes
