"""Model hyper-parameters, read from any published config layout.

One dataclass, `ModelConfig`, holds everything the transformer needs. It is built from a Hugging
Face `config.json` (`from_hf`), from OpenAI's `original/config.json` (`from_original`), or from a
named preset (`preset("20b")`, `preset("120b")`), and written back in the Hugging Face spelling
(`to_hf`) so that converted folders stay readable by other tools.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import GptOssError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    sliding_window: int = 128
    # layer_types[i] is SLIDING or FULL; the published models slide on the even layers.
    layer_types: tuple[str, ...] = field(default=())
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_original_context: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    max_position_embeddings: int = 131072

    def __post_init__(self):
        if not self.layer_types:
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    def validate(self) -> None:
        """Reject configurations the model cannot run, with the reason."""
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        if any(t not in (SLIDING, FULL) for t in self.layer_types):
            problems.append(f"layer_types must be '{SLIDING}' or '{FULL}'")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.experts_per_token > self.num_experts:
            problems.append("experts_per_token exceeds num_experts")
        if self.hidden_size % 32 or self.intermediate_size % 32:
            problems.append(
                "hidden_size and intermediate_size must be multiples of 32 (MXFP4 blocks)"
            )
        if self.head_dim % 2:
            problems.append("head_dim must be even (RoPE rotates halves)")
        if problems:
            raise GptOssError("invalid model config: " + "; ".join(problems))

    @property
    def kv_group_size(self) -> int:
        """Query heads per KV head: query head h reads KV head h // kv_group_size."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        """From a Hugging Face `config.json` (model_type gpt_oss), old or new rope spelling."""
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", cls.rope_theta))
        try:
            return cls(
                num_hidden_layers=cfg["num_hidden_layers"],
                num_experts=cfg.get("num_local_experts", cfg.get("num_experts")),
                experts_per_token=cfg.get("num_experts_per_tok", cfg.get("experts_per_token", 4)),
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_attention_heads=cfg["num_attention_heads"],
                num_key_value_heads=cfg["num_key_value_heads"],
                head_dim=cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]),
                sliding_window=cfg.get("sliding_window", 128),
                layer_types=tuple(cfg.get("layer_types") or ()),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=float(theta),
                rope_scaling_factor=float(rope.get("factor", cls.rope_scaling_factor)),
                rope_original_context=int(
                    rope.get("original_max_position_embeddings", cls.rope_original_context)
                ),
                rope_beta_fast=float(rope.get("beta_fast", cls.rope_beta_fast)),
                rope_beta_slow=float(rope.get("beta_slow", cls.rope_beta_slow)),
                swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
                swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
                max_position_embeddings=cfg.get("max_position_embeddings", 131072),
            )
        except (KeyError, TypeError) as e:
            raise GptOssError(f"config.json is missing gpt-oss field {e}") from None

    @classmethod
    def from_original(cls, cfg: dict) -> ModelConfig:
        """From OpenAI's `original/config.json` (ntk_alpha = beta_slow, ntk_beta = beta_fast)."""
        try:
            return cls(
                num_hidden_layers=cfg["num_hidden_layers"],
                num_experts=cfg["num_experts"],
                experts_per_token=cfg["experts_per_token"],
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_attention_heads=cfg["num_attention_heads"],
                num_key_value_heads=cfg["num_key_value_heads"],
                head_dim=cfg["head_dim"],
                sliding_window=cfg["sliding_window"],
                rope_theta=float(cfg["rope_theta"]),
                rope_scaling_factor=float(cfg["rope_scaling_factor"]),
                rope_original_context=int(cfg["initial_context_length"]),
                rope_beta_fast=float(cfg.get("rope_ntk_beta", 32.0)),
                rope_beta_slow=float(cfg.get("rope_ntk_alpha", 1.0)),
                swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
            )
        except (KeyError, TypeError) as e:
            raise GptOssError(f"original/config.json is missing gpt-oss field {e}") from None

    def to_hf(self) -> dict:
        """The Hugging Face spelling of this config (model_type gpt_oss)."""
        return {
            "model_type": "gpt_oss",
            "architectures": ["GptOssForCausalLM"],
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.rope_original_context,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "truncate": False,
            },
            "swiglu_alpha": self.swiglu_alpha,
            "swiglu_limit": self.swiglu_limit,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": False,
            "attention_bias": True,
        }

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


PRESETS = {
    "20b": ModelConfig(num_hidden_layers=24, num_experts=32),
    "120b": ModelConfig(num_hidden_layers=36, num_experts=128),
}


def preset(name: str) -> ModelConfig:
    """The published shapes of gpt-oss-20b or gpt-oss-120b."""
    try:
        return PRESETS[name]
    except KeyError:
        raise GptOssError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None
