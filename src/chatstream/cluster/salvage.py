"""``lost_turn``: what a lost run's readers saw, as the turn to store in its session.

When an instance dies mid-turn, what its readers were sent lives on only in the run's
shared log. The instance that declares the run lost rebuilds from those events what the
owner would have stored had the turn been cut there (``agent.Turn.to_store``): the turn's
opening (the user's message), each tool round with a result for every call (a call cut
short gets the result of a call stopped before it finished, and one that waited for
approval is marked cancelled), and the text streamed since, as an answer marked
interrupted. The rounds are read off the events' order: a round's ``tool_call`` events
come together after its text, then its results, before the next round's text or calls.
"""

from __future__ import annotations

from collections.abc import Iterable

from chatstream import messages as m
from chatstream.agent import Turn
from chatstream.approvals import Verdict
from chatstream.coordinator import Opening
from chatstream.events import ApprovalRequired, Event, Token, ToolCall, ToolResult

STOPPED = "The server running this turn stopped before the tool finished."


def lost_turn(opening: Opening, events: Iterable[Event]) -> list[m.Message]:
    """The messages to store for a turn that began with ``opening`` and sent ``events``."""
    turn = Turn(None, prelude=list(opening.messages))
    calls: list[m.ToolCallRequest] = []
    results: dict[str, ToolResult] = {}
    text: list[str] = []
    # A turn that continues a parked one first finishes that one's round, whose step (the
    # model's text and calls) is stored already: only its results are new.
    stored_step = opening.continues

    def close_round() -> None:
        nonlocal stored_step
        if not stored_step:
            turn.steps.append(m.assistant("".join(text), tool_calls=tuple(calls)))
        stored_step = False
        for call in calls:
            result = results.get(call.id)
            if result is not None:
                approval = result.approval or turn.approvals.get(call.id)
                turn.steps.append(
                    m.tool_result(call, result.result, is_error=result.is_error, approval=approval)
                )
                continue
            approval = None
            if call.id in turn.approvals:
                approval = turn.approvals[call.id] = Verdict.CANCELLED
            turn.steps.append(m.tool_result(call, STOPPED, is_error=True, approval=approval))
        text.clear()
        calls.clear()
        results.clear()

    for event in events:
        if isinstance(event, Token):
            if calls:
                close_round()
            text.append(event.content)
        elif isinstance(event, ToolCall):
            if calls and all(call.id in results for call in calls):
                close_round()  # the next round began without text
            calls.append(m.ToolCallRequest(event.id, event.tool, event.args))
        elif isinstance(event, ApprovalRequired):
            turn.approvals[event.id] = Verdict.PENDING
        elif isinstance(event, ToolResult):
            results[event.id] = event
            if event.approval is not None:
                turn.approvals[event.id] = event.approval
    if calls:
        close_round()
    turn.answer = text
    return turn.to_store()
