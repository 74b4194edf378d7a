"""Logit-lens trajectory of any causal LM on one prompt, in the snapshot format that
`figures.prediction_trajectory` and `figures.attention_maps` draw."""

from __future__ import annotations


def format_prompt(tokenizer, prompt: str, chat: bool | None = None) -> str:
    """The prompt as the model sees it: through its chat template when it has one (or `chat`)."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if not use_chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def lens_trajectory(model, tokenizer, prompt: str, max_new_tokens: int = 16,
                    student_layers: list[int] | None = None, chat: bool | None = None) -> dict:
    """Greedy-generate up to `max_new_tokens`, then read every layer with the model's own logit lens
    (`student_layers` as `method.layers`; default: the default student layer):
    `top_token[k][i]` / `top_prob[k][i]` are layer k's top-1 prediction for completion token i;
    `attention` holds head-mean maps of the student layers and the final layer."""
    # imported here: the rest of `analysis` reads files and must load without torch
    import torch

    # model code on use: the analysis package stays torch-free until a trajectory is asked for
    from ..diagnostics import snapshot
    from ..lens import find_readout
    from ..lens import student_layers as students_of
    from ..rollout import generate

    readout = find_readout(model)
    layers = students_of(student_layers, readout.num_layers)
    with torch.no_grad():
        rollout = generate(model, tokenizer, [format_prompt(tokenizer, prompt, chat)], 1, max_new_tokens,
                           do_sample=False)
        (row,) = snapshot(model.eval(), readout, rollout, [0], layers, tokenizer)
    return {**row, "student_layers": layers, "advantage": None, "prompt": prompt}
