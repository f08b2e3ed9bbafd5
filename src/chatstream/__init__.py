"""chatstream: stream an LLM agent's answer and tool work over Server-Sent Events."""

__version__ = "0.1.0"
