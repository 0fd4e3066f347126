"""Flax models: CLIP towers (`clip`) and the CLIP-ReID heads and prompt learner (`clipreid`)."""
