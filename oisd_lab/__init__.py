"""oisd_lab: GRPO and On-Policy Internal Self-Distillation, with a per-layer view."""
