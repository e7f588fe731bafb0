"""A target's architecture without its weights: what `draftsmith train --dry-run` (train/dry_run.py)
and a dry parallel drafter (models/parallel.py) build on the meta device."""

from __future__ import annotations

from pathlib import Path

from draftsmith.errors import DraftsmithError

# Published architectures of targets whose weights this machine may not hold.
KNOWN_CONFIGS: dict[str, dict] = {
    "smollm2-135m-instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True),
    "gemma3-270m": dict(
        model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=512, query_pre_attn_scalar=256,
        max_position_embeddings=32768, tie_word_embeddings=True),
    "llama-3.1-8b-instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=False),
    "llama-3.2-1b-instruct": dict(   # the drafter the Llama-3.1-8B parallel recipe starts from (PARD's choice)
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=True),
}


def target_config(name: str):
    """A transformers config of `name` without its weights: a folder's config.json, else the table above."""
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if (path / "config.json").exists():
        return AutoConfig.from_pretrained(path)
    key = name.lower().split("/")[-1]
    if key in KNOWN_CONFIGS:
        raw = dict(KNOWN_CONFIGS[key])
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    raise DraftsmithError("The dry run does not know this target's architecture", name,
                          f"Give a folder holding its config.json, or one of: {', '.join(KNOWN_CONFIGS)}")
