"""The bundled fixtures: each built so that named classes of porting bug move its numbers far
beyond tolerance (DESIGN.md, "Fixtures are built to expose bugs")."""

from __future__ import annotations

from dataclasses import dataclass, field

BASE_MODEL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    initializer_range=0.05,
)
BASE_SETTINGS = dict(
    trainable="full",
    optimizer=dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01, bias_correction=True),
    schedule=dict(kind="constant"),
    clip_norm=None,
    accum_steps=1,
    loss=dict(alpha=2.7, **{"lambda": 1.0}),
    steps=4,
    checkpoint_at=2,
)


@dataclass(frozen=True)
class FixtureSpec:
    name: str
    description: str
    exposes: list[str]
    seed: int
    model: dict = field(default_factory=dict)  # overrides of BASE_MODEL
    settings: dict = field(default_factory=dict)  # overrides of BASE_SETTINGS (one level deep)
    batch_size: int = 4
    seq_len: int = 16
    pad: tuple[int, ...] = (0, 3, 0, 7)  # right padding per row
    max_shard_size: str | None = None  # sharded checkpoint when set
    embed_scale: float = 1.0  # shrink embeddings so RMSNorm's eps matters
    rotary_buffer: bool = False  # add an old-style rotary_emb.inv_freq key, which loading must ignore
    config_layout: str = "transformers5"  # or "transformers4": rope_theta (and rope_scaling) at the top level
    model_type: str = "llama"  # the family transformers builds the checkpoint with: llama, mistral, qwen2, qwen3
    checkpoint_dtype: str = (
        "float32"  # the dtype the checkpoint stores (bfloat16: released models'); settings' precision trains
    )

    def model_config(self) -> dict:
        return {**BASE_MODEL, **self.model}

    def settings_dict(self) -> dict:
        s = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE_SETTINGS.items()}
        for k, v in self.settings.items():
            s[k] = {**s[k], **v} if isinstance(v, dict) and isinstance(s.get(k), dict) else v
        return s


SPECS = [
    FixtureSpec(
        "gqa_padded",
        "grouped-query attention (4 query heads on 2 kv heads), B=4 with two right-padded rows, full training, AdamW with bias correction",
        [
            "weights_not_loaded",
            "key_prefix",
            "gqa_head_mapping",
            "rope",
            "no_shift",
            "padding_counted",
            "forward_only",
            "optimizer_disconnected",
            "bias_correction",
        ],
        seed=1,
    ),
    FixtureSpec(
        "mha_sharded",
        "multi-head attention from a checkpoint in 6 shards, head_dim 16 (not hidden/heads = 8), rope_theta 500000, "
        "AdamW without bias correction (MLX's default)",
        [
            "sharded_loading",
            "weights_not_loaded",
            "bias_correction",
            "optimizer_disconnected",
            "head_dim_from_hidden",
            "rope_theta_hardcoded",
        ],
        seed=2,
        model=dict(num_key_value_heads=4, head_dim=16, rope_theta=500000.0),
        settings=dict(optimizer=dict(bias_correction=False)),
        max_shard_size="30KB",
    ),
    FixtureSpec(
        "tied",
        "tied input and output embeddings, 4 query heads on 1 kv head, a checkpoint with a legacy rotary buffer, "
        "config.json in the transformers 4 layout (rope_theta 1e6 at the top level)",
        [
            "tied_embeddings_ignored",
            "gqa_head_mapping",
            "rotary_buffer_loaded",
            "config_layout",
            "rope_theta_hardcoded",
        ],
        seed=3,
        model=dict(tie_word_embeddings=True, num_key_value_heads=1, rope_theta=1e6),
        rotary_buffer=True,
        config_layout="transformers4",
    ),
    FixtureSpec(
        "lora",
        "LoRA adapters on q/k/v/o of the last layer (rank 4), loaded mid-training so both adapter matrices have gradients; "
        "distrust alpha 2.3 and lambda 0.5",
        ["trainable_set_mismatch", "lora_scale", "optimizer_disconnected", "distrust_alpha", "distrust_lambda"],
        seed=4,
        settings=dict(trainable="lora", lora=dict(rank=4, layers=1, scale=2.0), loss={"alpha": 2.3, "lambda": 0.5}),
    ),
    FixtureSpec(
        "head",
        "only lm_head and the final norm train (what the seed's Rust port trains); distrust lambda 0.25",
        ["trainable_set_mismatch", "key_prefix", "forward_only", "distrust_lambda"],
        seed=5,
        settings=dict(trainable="head", loss={"lambda": 0.25}),
    ),
    FixtureSpec(
        "gqa_single",
        "grouped-query attention (4 query heads on 2 kv heads) with batch size 1, head_dim 12, rope_theta 50000, "
        "rms_norm_eps 1e-6",
        ["gqa_head_mapping", "head_dim_from_hidden", "rope_theta_hardcoded", "rmsnorm_eps_hardcoded"],
        seed=10,
        model=dict(head_dim=12, rope_theta=50000.0, rms_norm_eps=1e-6),
        batch_size=1,
        pad=(0,),
    ),
    FixtureSpec(
        "clip_accum_warmup",
        "global-norm clipping that is active, 2 accumulated micro-batches, warmup then cosine, 6 updates",
        ["clipping_missing", "accumulation_scaling", "schedule_off_by_one", "bias_correction"],
        seed=6,
        settings=dict(
            clip_norm=0.5,
            accum_steps=2,
            steps=6,
            checkpoint_at=3,
            schedule=dict(kind="warmup_cosine", warmup_steps=2, warmup_init=2e-4, decay_steps=6, end_lr=1e-4),
        ),
    ),
    FixtureSpec(
        "accum_head",
        "2 accumulated micro-batches without clipping (clipping would hide the gradients' scale), head training",
        ["accumulation_scaling", "trainable_set_mismatch"],
        seed=9,
        settings=dict(trainable="head", accum_steps=2),
    ),
    FixtureSpec(
        "small_eps_bias",
        "small activations (embeddings scaled by 0.05) with rms_norm_eps=1e-6, so a hard-coded eps shows; projection biases on",
        ["rmsnorm_eps_hardcoded", "bias_ignored", "weight_decay_missing"],
        seed=7,
        model=dict(rms_norm_eps=1e-6, attention_bias=True, mlp_bias=True),
        embed_scale=0.05,
        settings=dict(optimizer=dict(weight_decay=0.1, lr=1e-2)),
    ),
    FixtureSpec(
        "trajectory_long",
        "8 updates with a checkpoint at 5: drift over a longer trajectory and resume",
        ["optimizer_state_lost_on_resume", "schedule_off_by_one", "bias_correction"],
        seed=8,
        settings=dict(
            steps=8,
            checkpoint_at=5,
            schedule=dict(kind="warmup_cosine", warmup_steps=3, warmup_init=1e-4, decay_steps=5, end_lr=0.0),
        ),
    ),
    # Model families: each small (B=2), each checked against transformers' own class for its model_type.
    FixtureSpec(
        "llama3_rope",
        "Llama 3.x RoPE scaling (llama3: factor 8, low 1, high 4, original context 128, so the four frequencies "
        "fall in all three bands), config in the transformers 4 layout (rope_scaling at the top level)",
        ["rope_scaling_ignored", "config_layout", "rope_position"],
        seed=11,
        model=dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=128,
            ),
            max_position_embeddings=256,
        ),
        batch_size=2,
        pad=(0, 3),
        config_layout="transformers4",
    ),
    FixtureSpec(
        "qwen2",
        "Qwen2: biases on q/k/v but not on o_proj, rope_theta 1e6, untied head",
        ["bias_ignored", "o_proj_bias_added", "rope_theta_hardcoded"],
        seed=12,
        model_type="qwen2",
        model=dict(rope_theta=1e6, rms_norm_eps=1e-6),
        batch_size=2,
        pad=(0, 5),
    ),
    FixtureSpec(
        "mistral",
        "Mistral (model_type mistral, no sliding window), rope_theta 1e6, 4 query heads on 1 kv head",
        ["model_type", "gqa_head_mapping", "rope_theta_hardcoded"],
        seed=13,
        model_type="mistral",
        model=dict(rope_theta=1e6, num_key_value_heads=1, sliding_window=None),
        batch_size=2,
        pad=(0, 2),
    ),
    FixtureSpec(
        "qwen3",
        "Qwen3: an RMSNorm over head_dim on every query and key head before RoPE (q_norm, k_norm), no biases, "
        "rope_theta 1e6, tied embeddings",
        ["qk_norm_ignored", "rope_theta_hardcoded", "tied_embeddings_ignored"],
        seed=15,
        model_type="qwen3",
        model=dict(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
        batch_size=2,
        pad=(0, 3),
    ),
    FixtureSpec(
        "bf16_checkpoint",
        "a checkpoint stored in bfloat16 (how released models ship), trained with float32 master weights; "
        "4 query heads on 2 kv heads, rope_theta 5e5",
        ["checkpoint_dtype", "gqa_head_mapping", "rope_theta_hardcoded"],
        seed=14,
        model=dict(rope_theta=5e5),
        batch_size=2,
        pad=(0, 4),
        checkpoint_dtype="bfloat16",
    ),
    # Training in bfloat16 (mlx-lm's default for a bfloat16 model): goldens and bounds in that precision.
    FixtureSpec(
        "bf16_lora",
        "LoRA (rank 4, both layers) on a bfloat16 model trained in bfloat16, the way mlx-lm fine-tunes by "
        "default: bfloat16 weights and forward, float32 adapters, float32 loss",
        ["precision", "trainable_set_mismatch", "lora_scale", "optimizer_disconnected"],
        seed=16,
        settings=dict(trainable="lora", lora=dict(rank=4, layers=2, scale=2.0), precision="bfloat16"),
        batch_size=2,
        pad=(0, 5),
        checkpoint_dtype="bfloat16",
    ),
    FixtureSpec(
        "bf16_full",
        "full training in bfloat16 from a float32 checkpoint (rounded to bfloat16 on loading): bfloat16 "
        "gradients, AdamW moments and updates, active clipping, 2 accumulated micro-batches, warmup then cosine",
        ["precision", "weights_not_loaded", "clipping_missing", "accumulation_scaling", "optimizer_disconnected"],
        seed=17,
        model=dict(num_hidden_layers=1),
        settings=dict(
            precision="bfloat16",
            clip_norm=0.5,
            accum_steps=2,
            schedule=dict(kind="warmup_cosine", warmup_steps=2, warmup_init=2e-4, decay_steps=4, end_lr=1e-4),
        ),
        batch_size=2,
        pad=(0, 4),
    ),
]
