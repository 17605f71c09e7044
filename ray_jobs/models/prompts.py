"""Prompt rendering: the one place a raw prompt or a conversation becomes the exact text a response follows."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]


def _check_messages(messages: Messages) -> None:
    if not messages:
        raise ValueError("conversation prompt is empty: expected a list of {role, content} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"conversation message {i} must be a dict with a string 'role', got {message!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"conversation message {i} ({message['role']}) must have a string 'content'")


def _plain(messages: Messages) -> str:
    # For tokenizers without a chat template (and when templating is off) a readable transcript is the best
    # neutral rendering; it ends with the assistant cue so a response follows naturally.
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return turns if messages[-1]["role"] == "assistant" else turns + "Assistant:"


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, apply_chat_template: bool = True) -> str:
    """Render a prompt as text ready for a response to be appended.

    A string prompt is wrapped as one user turn when templating is on and the tokenizer has a chat template, else
    returned as is. A conversation ends with the generation prompt (unless its last turn is the assistant's).
    """
    if isinstance(prompt, str):
        if not (apply_chat_template and tokenizer.chat_template):
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list):
        raise ValueError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    _check_messages(prompt)
    if not (apply_chat_template and tokenizer.chat_template):
        return _plain(prompt)
    return tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=prompt[-1]["role"] != "assistant"
    )
