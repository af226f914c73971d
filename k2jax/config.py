"""K2Config: the Kimi K2 / DeepSeek-V3 architecture hyper-parameters, read from an HF config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json field is missing, malformed or unsupported; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Int4Quant:
    """compressed-tensors pack-quantized INT4 of the routed experts (group-wise, symmetric)."""

    num_bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    format: str = "pack-quantized"


@dataclasses.dataclass(frozen=True)
class K2Config:
    """Architecture of a DeepseekV3ForCausalLM-family model (Kimi K2 Thinking by default)."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 1
    num_attention_heads: int = 64
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    rope_theta: float = 50000.0
    rope_type: str = "yarn"
    rope_factor: float = 64.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 1.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    rope_attention_factor: float | None = None
    rope_truncate: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int = 163584
    eos_token_id: int = 163585
    quant: Int4Quant | None = Int4Quant()

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_lanes(self) -> int:
        """Width of one cached token: c_kv | k_pe, zero-padded to a multiple of 128 lanes (TPU-friendly)."""
        return -(-(self.kv_lora_rank + self.qk_rope_head_dim) // 128) * 128

    @property
    def cache_pad(self) -> int:
        """The zero lanes after c_kv | k_pe in a cached token, and in kv_a's columns, which are laid out the same."""
        return self.cache_lanes - self.kv_lora_rank - self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times the YaRN mscale(mscale_all_dim)^2 correction."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn" and self.mscale_all_dim:
            scale *= yarn_mscale(self.rope_factor, self.mscale_all_dim) ** 2
        return scale

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> K2Config:
        """Build from an HF DeepseekV3/Kimi K2 config dict (old `rope_scaling` or new `rope_parameters`)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        for key in ("rope_parameters", "rope_scaling", "quantization_config"):
            if raw.get(key) is not None and not isinstance(raw[key], dict):
                raise ConfigError(f"{source}: {key} must be an object or null, got {type(raw[key]).__name__}")
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in raw and field.name not in _DERIVED_FIELDS:
                kwargs[field.name] = raw[field.name]
        if raw.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported (K2 has no attention biases)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (only 'silu')")
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(raw.get(key), list):
                kwargs[key] = raw[key][0]
        kwargs.update(_rope_fields(raw, source))
        kwargs["quant"] = _quant_field(raw.get("quantization_config"), source)
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> K2Config:
        """Read a config.json file (or the config.json inside a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json dict (DeepseekV3ForCausalLM, model_type kimi_k2) for this config."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "kimi_k2",
            "num_key_value_heads": self.num_attention_heads,
            "num_nextn_predict_layers": 0,
            "moe_layer_freq": 1,
            "attention_bias": False,
            "rope_interleave": True,
            "torch_dtype": "bfloat16",
        }
        for field in dataclasses.fields(self):
            if field.name not in _DERIVED_FIELDS:
                out[field.name] = getattr(self, field.name)
        if self.rope_type == "yarn":
            out["rope_scaling"] = {
                "type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
                "mscale": self.mscale,
                "mscale_all_dim": self.mscale_all_dim,
            }
            if self.rope_attention_factor is not None:
                out["rope_scaling"]["attention_factor"] = self.rope_attention_factor
        else:
            out["rope_scaling"] = None
        if self.quant is not None:
            out["quantization_config"] = _quant_dict(self.quant)
        return out


_DERIVED_FIELDS = {
    "rope_type",
    "rope_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "rope_attention_factor",
    "rope_truncate",
    "quant",
}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention-magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Map `rope_scaling` (old) or `rope_parameters` (new) onto K2Config's flat rope fields."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    fields: dict[str, Any] = {}
    if rope is not None and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    rope_type = None if rope is None else rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        fields["rope_type"] = "default"
        return fields
    if rope_type != "yarn":
        raise ConfigError(f"{source}: rope_scaling.type={rope_type!r} is not supported (only 'yarn')")
    fields["rope_type"] = "yarn"
    if "original_max_position_embeddings" not in rope:
        raise ConfigError(f"{source}: rope_scaling.original_max_position_embeddings is required for yarn")
    fields["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    max_pos = raw.get("max_position_embeddings", K2Config.max_position_embeddings)
    factor = rope.get("factor")
    fields["rope_factor"] = factor if factor is not None else max_pos / rope["original_max_position_embeddings"]
    fields["beta_fast"] = rope.get("beta_fast") or 32.0
    fields["beta_slow"] = rope.get("beta_slow") or 1.0
    fields["mscale"] = rope.get("mscale") or 0.0
    fields["mscale_all_dim"] = rope.get("mscale_all_dim") or 0.0
    fields["rope_attention_factor"] = rope.get("attention_factor")
    fields["rope_truncate"] = rope.get("truncate", True)
    return fields


def _quant_field(qc: dict[str, Any] | None, source: str) -> Int4Quant | None:
    """Parse a compressed-tensors quantization_config; anything but INT4 g32 symmetric pack-quantized fails."""
    if qc is None:
        return None
    where = f"{source}: quantization_config"
    if qc.get("quant_method", "compressed-tensors") != "compressed-tensors":
        raise ConfigError(f"{where}.quant_method={qc.get('quant_method')!r} is not supported")
    if qc.get("format") != "pack-quantized":
        raise ConfigError(f"{where}.format={qc.get('format')!r} is not supported (only 'pack-quantized')")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ConfigError(f"{where}.config_groups must hold exactly one group, found {len(groups)}")
    name, group = next(iter(groups.items()))
    weights = group.get("weights") or {}
    expected = {"num_bits": 4, "group_size": 32, "symmetric": True, "type": "int", "strategy": "group"}
    for key, value in expected.items():
        if weights.get(key) != value:
            raise ConfigError(
                f"{where}.config_groups.{name}.weights.{key}={weights.get(key)!r} is not supported "
                f"(k2jax reads {key}={value!r})"
            )
    if group.get("input_activations") is not None:
        raise ConfigError(f"{where}.config_groups.{name}.input_activations must be null (weight-only INT4)")
    return Int4Quant()


def _quant_dict(quant: Int4Quant) -> dict[str, Any]:
    """The compressed-tensors quantization_config that Moonshot ships with K2 Thinking."""
    return {
        "config_groups": {
            "group_0": {
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "actorder": None,
                    "block_structure": None,
                    "dynamic": False,
                    "group_size": quant.group_size,
                    "num_bits": quant.num_bits,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "strategy": "group",
                    "symmetric": quant.symmetric,
                    "type": "int",
                },
            }
        },
        "format": quant.format,
        "ignore": [
            "lm_head",
            "re:.*self_attn.*",
            "re:.*shared_experts.*",
            "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
        ],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
    "original_max_position_embeddings",
)
# field -> (low, high, low included); every one must also be a finite number
_REAL_RANGES = {
    "routed_scaling_factor": (0.0, math.inf, False),
    "rms_norm_eps": (0.0, 1.0, False),
    "rope_theta": (0.0, math.inf, False),
    "rope_factor": (0.0, math.inf, False),
    "beta_fast": (0.0, math.inf, False),
    "beta_slow": (0.0, math.inf, False),
    "mscale": (0.0, math.inf, True),
    "mscale_all_dim": (0.0, math.inf, True),
}
_BOOLS = ("norm_topk_prob", "tie_word_embeddings", "rope_truncate")
_JSON_NAMES = {  # K2Config fields read from rope_scaling / rope_parameters, as config.json names them
    "rope_factor": "rope_scaling.factor", "original_max_position_embeddings":
        "rope_scaling.original_max_position_embeddings", "beta_fast": "rope_scaling.beta_fast",
    "beta_slow": "rope_scaling.beta_slow", "mscale": "rope_scaling.mscale", "mscale_all_dim":
        "rope_scaling.mscale_all_dim", "rope_attention_factor": "rope_scaling.attention_factor",
    "rope_truncate": "rope_scaling.truncate",
}


def _is_int(value: Any) -> bool:
    """Whether `value` is an integer (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_real(name: str, value: Any, low: float, high: float, low_included: bool) -> None:
    """ConfigError unless `value` is a finite number in [low, high) or (low, high) (high open unless infinite)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and (low <= value if low_included else low < value) and value < high):
        interval = f"{'[' if low_included else '('}{low:g}, {high:g})"
        raise ConfigError(f"{_JSON_NAMES.get(name, name)} must be a finite number in {interval}, got {value!r}")


def _validate(cfg: K2Config) -> None:
    """Raise ConfigError naming the first field that cannot describe a working model."""
    for name in _POSITIVE_INTS:
        value = getattr(cfg, name)
        if not _is_int(value) or value <= 0:
            raise ConfigError(f"{_JSON_NAMES.get(name, name)} must be a positive integer, got {value!r}")
    for name in ("first_k_dense_replace", "n_shared_experts"):
        if not _is_int(getattr(cfg, name)):
            raise ConfigError(f"{name} must be an integer, got {getattr(cfg, name)!r}")
    for name, (low, high, low_included) in _REAL_RANGES.items():
        _check_real(name, getattr(cfg, name), low, high, low_included)
    if cfg.rope_attention_factor is not None:
        _check_real("rope_attention_factor", cfg.rope_attention_factor, 0.0, math.inf, False)
    for name in _BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{_JSON_NAMES.get(name, name)} must be true or false, got {getattr(cfg, name)!r}")
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(cfg, name)
        if value is not None and not (_is_int(value) and 0 <= value < cfg.vocab_size):
            raise ConfigError(f"{name} must be a token id in [0, vocab_size={cfg.vocab_size}) or null, got {value!r}")
    if cfg.q_lora_rank is not None and (not _is_int(cfg.q_lora_rank) or cfg.q_lora_rank <= 0):
        raise ConfigError(f"q_lora_rank must be a positive integer or null, got {cfg.q_lora_rank!r}")
    if cfg.qk_rope_head_dim % 2:
        raise ConfigError(f"qk_rope_head_dim must be even (rotary pairs), got {cfg.qk_rope_head_dim}")
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
        raise ConfigError(
            f"first_k_dense_replace must be in [0, num_hidden_layers={cfg.num_hidden_layers}], "
            f"got {cfg.first_k_dense_replace}"
        )
    if cfg.num_experts_per_tok > cfg.n_routed_experts:
        raise ConfigError(
            f"num_experts_per_tok={cfg.num_experts_per_tok} exceeds n_routed_experts={cfg.n_routed_experts}"
        )
    if cfg.n_shared_experts < 0:
        raise ConfigError(f"n_shared_experts must be >= 0, got {cfg.n_shared_experts}")
    if cfg.n_routed_experts % cfg.n_group:
        raise ConfigError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by n_group={cfg.n_group}")
    if cfg.topk_group > cfg.n_group:
        raise ConfigError(f"topk_group={cfg.topk_group} exceeds n_group={cfg.n_group}")
    if cfg.n_group > 1 and cfg.n_routed_experts // cfg.n_group < 2:
        raise ConfigError("each expert group needs at least 2 experts (group score = sum of its top 2)")
    if cfg.num_experts_per_tok > cfg.topk_group * (cfg.n_routed_experts // cfg.n_group):
        raise ConfigError(
            f"num_experts_per_tok={cfg.num_experts_per_tok} exceeds the experts in topk_group={cfg.topk_group} groups"
        )
    if cfg.scoring_func != "sigmoid":
        raise ConfigError(f"scoring_func={cfg.scoring_func!r} is not supported (only 'sigmoid')")
    if cfg.topk_method != "noaux_tc":
        raise ConfigError(f"topk_method={cfg.topk_method!r} is not supported (only 'noaux_tc')")
    if cfg.quant is not None:
        for name in ("hidden_size", "moe_intermediate_size"):
            if getattr(cfg, name) % cfg.quant.group_size:
                raise ConfigError(
                    f"{name}={getattr(cfg, name)} is not a multiple of the INT4 group size {cfg.quant.group_size}"
                )


PRESETS: dict[str, K2Config] = {
    "kimi-k2-thinking": K2Config(),
    "small": K2Config(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
        num_hidden_layers=8, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64,
        max_position_embeddings=8192, original_max_position_embeddings=1024, rope_factor=8.0,
        bos_token_id=0, eos_token_id=1, quant=None,
    ),
    "tiny": K2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512, original_max_position_embeddings=128, rope_factor=4.0,
        routed_scaling_factor=2.5, bos_token_id=0, eos_token_id=1, quant=None,
    ),
}


def preset(name: str) -> K2Config:
    """A named configuration: 'kimi-k2-thinking' (the full model), 'small' (benchmarks) or 'tiny' (tests)."""
    key = name.replace("_", "-")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[key]
