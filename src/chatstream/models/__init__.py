"""Models behind one protocol, chosen by a spec string.

``local`` (the embedded llama.cpp model, the default: Qwen2.5-Coder-1.5B-Instruct),
``local:small`` (the embedded 0.5B, for small machines), ``local:<file.gguf>``,
``openai:<model>``, ``anthropic:<model>``, ``scripted`` or ``scripted:<delay_ms>``.
Each backend is imported only when asked for, so a missing optional package
only matters to whoever names it.
"""

from __future__ import annotations

from pathlib import Path

from chatstream.models.base import Model, ModelEvent, TextDelta, ToolSpec, Usage

__all__ = ["Model", "ModelEvent", "TextDelta", "ToolSpec", "Usage", "resolve"]


def resolve(spec: str) -> Model:
    """The model a spec names; ``ValueError`` with a hint for a spec chatstream cannot serve."""
    kind, _, argument = spec.partition(":")
    if kind == "scripted":
        from chatstream.models.scripted import ScriptedModel

        try:
            delay_ms = float(argument) if argument else 0.0
        except ValueError:
            raise ValueError(
                f"scripted takes a delay in ms, as in scripted:50, not {spec!r}"
            ) from None
        return ScriptedModel(delay_s=delay_ms / 1000)
    if kind == "openai":
        if not argument:
            raise ValueError("name the model, as in openai:gpt-4o-mini")
        from chatstream.models.openai import OpenAIModel

        return OpenAIModel(argument)
    if kind == "anthropic":
        if not argument:
            raise ValueError("name the model, as in anthropic:claude-sonnet-4-5")
        from chatstream.models.anthropic import AnthropicModel

        return AnthropicModel(argument)
    if kind == "local":
        try:
            from chatstream.models.local import LocalModel
        except ImportError as exc:
            raise ValueError(
                f"the local model needs llama-cpp-python: pip install 'chatstream[local]' ({exc})"
            ) from None
        from chatstream.models.weights import WEIGHTS

        # A file named like a pinned set is still reachable by its path: local:./small.
        pinned = WEIGHTS.get(spec if argument else "local")
        return LocalModel(weights=pinned) if pinned else LocalModel(Path(argument))
    raise ValueError(
        f"unknown model spec {spec!r}; use local, local:small, local:<file.gguf>, openai:<model>, "
        "anthropic:<model> or scripted"
    )
