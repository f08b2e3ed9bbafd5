"""Tools: typed async functions with a JSON schema taken from their signature.

A tool is an ``async def`` whose first parameter is a ``ToolContext`` and whose
other parameters are typed; ``@tool`` reads the type hints and the docstring
(first paragraph: description; ``Args:`` section: parameter descriptions) into
the JSON schema the model sees, and validates the model's arguments against the
same types before the function runs. A tool reports progress through
``ctx.progress(...)`` and fails by raising ``ToolError`` (any other exception
is reported too, less politely); either way the turn goes on.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, cast, get_type_hints, overload

from pydantic import ConfigDict, TypeAdapter, ValidationError, create_model
from typing_extensions import TypeVar

from chatstream.config import ToolSettings
from chatstream.errors import ToolError
from chatstream.models.base import ToolSpec
from chatstream.tools.results import clean

ProgressSink = Callable[[str, float | None], None]
# A progress message is a line of status, not a result: longer ones are cut.
MAX_PROGRESS_CHARS = 1000
ToolFunction = Callable[..., Awaitable[str]]


DepsT = TypeVar("DepsT", default=None)


class ToolContext(Generic[DepsT]):
    """Handed to a running tool: where its progress goes, its settings, and its dependencies.

    ``settings`` are the server's tool settings (time limit, the built-in tools' bounds
    and endpoints). ``deps`` is what the application handed the agent for its own tools (a
    database pool, an HTTP client, ...), typed: a tool declared ``ctx: ToolContext[MyDeps]``
    reads ``ctx.deps`` as ``MyDeps``, as pydantic-ai's ``RunContext[Deps]`` does.
    """

    __slots__ = ("_sink", "deps", "settings")

    def __init__(
        self, sink: ProgressSink, settings: ToolSettings | None = None, deps: DepsT | None = None
    ) -> None:
        self._sink = sink
        self.settings = settings or ToolSettings()
        # None is what a context without dependencies (DepsT's default) holds.
        self.deps = cast(DepsT, deps)

    def progress(self, message: str, progress: float | None = None) -> None:
        """Report a step; ``progress`` is the fraction done (0..1) when known.

        Past a burst of 10, reports that come faster than 20 a second are thinned out,
        the latest one winning; the last always goes out before the result.
        """
        if progress is not None:
            progress = min(1.0, max(0.0, float(progress)))
        text = message if isinstance(message, str) else str(message)
        self._sink(clean(text)[:MAX_PROGRESS_CHARS], progress)


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool the model may call.

    ``source`` says where it comes from (``builtin``, ``python``, ``mcp:<server>``);
    ``approval`` whether a person must say yes before it runs. A tool without a
    ``validator`` takes its arguments as they come (an MCP server checks its own).
    """

    name: str
    description: str
    parameters: dict[str, Any]
    function: ToolFunction
    validator: TypeAdapter[Any] | None = None
    source: str = "python"
    approval: bool = False
    # Its own time limit (an MCP server's ``timeoutS``); None: the server's tool timeout.
    timeout_s: float | None = None

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Check and coerce the model's arguments; raise ``ToolError`` when they do not fit."""
        if self.validator is None:
            return arguments
        try:
            model = self.validator.validate_python(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ToolError(f"invalid arguments for {self.name}: {problems}") from None
        return dict(model.__dict__)

    async def __call__(self, ctx: ToolContext, arguments: dict[str, Any]) -> str:
        return await self.function(ctx, **self.validate(arguments))


@overload
def tool(function: ToolFunction, /) -> Tool: ...


@overload
def tool(
    *, name: str | None = None, description: str | None = None, approval: bool = False
) -> Callable[[ToolFunction], Tool]: ...


def tool(
    function: ToolFunction | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    approval: bool = False,
) -> Tool | Callable[[ToolFunction], Tool]:
    """Make a ``Tool`` from a typed ``async def name(ctx: ToolContext, ...) -> str``.

    Bare (``@tool``) or with options: ``@tool(name=..., description=..., approval=True)``
    (the name and description default to the function's name and docstring; ``approval``
    asks a person before the tool runs).
    """
    if function is None:
        return lambda f: _make_tool(f, name=name, description=description, approval=approval)
    return _make_tool(function, name=name, description=description, approval=approval)


def _make_tool(
    function: ToolFunction, *, name: str | None, description: str | None, approval: bool
) -> Tool:
    if not inspect.iscoroutinefunction(function):
        raise TypeError(f"a tool must be an async function: {function!r} is not")
    tool_name = name or function.__name__
    if not TOOL_NAME.fullmatch(tool_name):
        # What OpenAI's and Anthropic's APIs accept: another name fails every turn there.
        raise TypeError(
            f"tool name {tool_name!r} must be 1-64 characters of [A-Za-z0-9_-] (give "
            "@tool(name=...) another)"
        )
    signature = inspect.signature(function)
    if not signature.parameters:
        raise TypeError(f"tool {tool_name!r} must take a ToolContext first")
    for parameter in list(signature.parameters.values())[1:]:
        if parameter.kind in _UNNAMED:
            # The model calls a tool with a JSON object: every argument needs a name.
            raise TypeError(
                f"tool {tool_name!r}: parameter {parameter.name!r} must be one a call can "
                "name (no *args, **kwargs or positional-only parameters)"
            )
    hints = get_type_hints(function)
    summary, arg_docs = _parse_docstring(inspect.getdoc(function) or "")
    fields: dict[str, Any] = {}
    for index, (argument, parameter) in enumerate(signature.parameters.items()):
        if index == 0:
            continue  # the ToolContext
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[argument] = (hints[argument], default)
    arguments_model = create_model(
        f"{function.__name__}_arguments",
        __config__=ConfigDict(extra="forbid"),
        **fields,
    )
    schema = TypeAdapter(arguments_model).json_schema()
    schema.pop("title", None)
    for argument, prop in schema.get("properties", {}).items():
        prop.pop("title", None)
        if argument in arg_docs:
            prop["description"] = arg_docs[argument]
    schema["additionalProperties"] = False
    return Tool(
        name=tool_name,
        description=description if description is not None else summary,
        parameters=schema,
        function=function,
        validator=TypeAdapter(arguments_model),
        approval=approval,
    )


TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_UNNAMED = (
    inspect.Parameter.VAR_POSITIONAL,
    inspect.Parameter.VAR_KEYWORD,
    inspect.Parameter.POSITIONAL_ONLY,
)
_ARG_LINE = re.compile(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its summary paragraph and ``Args:`` entries."""
    summary, _, rest = doc.partition("\n\n")
    args: dict[str, str] = {}
    in_args = False
    current: str | None = None
    for line in rest.splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            in_args = True
            continue
        if in_args:
            if line and not line[0].isspace():
                break
            match = _ARG_LINE.match(line)
            if match:
                current = match.group(1)
                args[current] = match.group(2).strip()
            elif current and line.strip():
                args[current] += " " + line.strip()
    return " ".join(summary.split()), args


class ToolSource(Protocol):
    """Tools that come and go while the server runs (an MCP server's, say)."""

    def tools(self) -> Sequence[Tool]:
        """The tools offered now; empty while the source is down."""
        ...


class ToolRegistry:
    """The tools a server offers, by name: fixed ones, and those of live sources.

    A live source's tools are looked up on each use, so a server that restarts or
    changes its list changes what the next model round is offered; a name taken by a
    fixed tool is never shadowed by a source's.
    """

    def __init__(self, tools: Iterable[Tool] = (), sources: Iterable[ToolSource] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._sources = list(sources)
        for t in tools:
            self.add(t)

    def add(self, t: Tool) -> None:
        if t.name in self._tools:
            raise ValueError(f"tool {t.name!r} is registered twice")
        self._tools[t.name] = t

    def add_source(self, source: ToolSource) -> None:
        self._sources.append(source)

    def _all(self) -> dict[str, Tool]:
        if not self._sources:
            return self._tools
        found = dict(self._tools)
        for source in self._sources:
            for t in source.tools():
                found.setdefault(t.name, t)
        return found

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name) or (self._all().get(name) if self._sources else None)

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._all().values()))

    def __len__(self) -> int:
        return len(self._all())

    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self._all().values()]
