"""openai-harmony, the oracle: conversations built with its own API only (never with the code
under test), rendered as prompts or as the completion a model would write.

Import it after ``pytest.importorskip("openai_harmony")``.
"""

from __future__ import annotations

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)


def oracle_tools(*fns):
    return [
        ToolDescription.new(fn["name"], fn.get("description", ""), fn.get("parameters"))
        for fn in fns
    ]


EFFORT = {
    "low": ReasoningEffort.LOW,
    "medium": ReasoningEffort.MEDIUM,
    "high": ReasoningEffort.HIGH,
}


def o_system(effort="medium", date=None):
    content = SystemContent.new().with_reasoning_effort(EFFORT[effort])
    if date:
        content = content.with_conversation_start_date(date)
    return Message.from_role_and_content(Role.SYSTEM, content)


def o_developer(instructions=None, tools=()):
    content = DeveloperContent.new()
    if instructions is not None:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools(oracle_tools(*tools))
    return Message.from_role_and_content(Role.DEVELOPER, content)


def o_user(text):
    return Message.from_role_and_content(Role.USER, text)


def o_assistant(text, channel):
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def o_call(name, arguments):
    return (
        Message.from_role_and_content(Role.ASSISTANT, arguments)
        .with_channel("commentary")
        .with_recipient(f"functions.{name}")
        .with_content_type("<|constrain|>json")
    )


def o_result(name, text):
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
        .with_channel("commentary")
        .with_recipient("assistant")
    )


def prompt(harmony_enc, *messages) -> list[int]:
    """openai-harmony's prompt for the conversation, ending ``<|start|>assistant``."""
    return harmony_enc.render_conversation_for_completion(
        Conversation.from_messages(list(messages)), Role.ASSISTANT
    )


def completion_tokens(harmony_enc, tok, messages):
    """Render messages the way the model emits them: no leading <|start|>assistant, and a
    final answer ending in <|return|>."""
    ids = []
    for m in messages:
        ids += harmony_enc.render(m)
    head = [tok.start_id] + tok.encode("assistant")
    assert ids[: len(head)] == head
    ids = ids[len(head) :]
    if messages[-1].channel == "final":
        assert ids[-1] == tok.end_id
        ids[-1] = tok.return_id
    return ids
