"""Residual-stream edits: steering vectors, SAE feature clamps, directional ablation, and the
batched intervention core shared by every engine. Pure torch + pydantic."""
