"""Chat and instruction data: conversations rendered with a chat template, loss on assistant turns.

A conversation is a list of ``{"role", "content"}`` messages (OpenAI style; ShareGPT's
``{"from", "value"}`` with roles ``human``/``gpt`` is accepted too). It is rendered with the
tokenizer's chat template, or a named one from :data:`TEMPLATES` when the tokenizer has none.
Every assistant turn is trained: its tokens (and the template's end-of-turn marker after it) get
labels, every other token gets ``IGNORE``. Assistant spans are found by rendering the conversation
up to each turn (with the generation prompt, then with the reply), so any template that renders
a conversation incrementally works without special ``{% generation %}`` markers.
"""
from __future__ import annotations

from ..errors import ConfigError

IGNORE = -100

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}

# Named templates for tokenizers without one (base models). Jinja, as transformers renders them.
TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
               "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
    # Stanford Alpaca's prompt; a system message replaces the preamble; turns repeat the two headers.
    "alpaca": ("{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% else %}"
               "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n' }}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
               "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"),
}


def set_chat_template(tokenizer, choice: str, where: str = "model.tokenizer") -> None:
    """Make ``tokenizer.chat_template`` the one ``task.chat_template`` names: ``auto`` keeps the
    tokenizer's own (an error when it has none), a name from :data:`TEMPLATES`, or a Jinja string."""
    if choice == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{where} has no chat template; set task.chat_template to one of "
                              f"{', '.join(TEMPLATES)} (or a Jinja template string)")
        return
    if choice in TEMPLATES:
        tokenizer.chat_template = TEMPLATES[choice]
    elif "{%" in choice or "{{" in choice:
        tokenizer.chat_template = choice
    else:
        raise ConfigError(f"task.chat_template = {choice!r}; allowed: auto (the tokenizer's), "
                          f"{', '.join(TEMPLATES)}, or a Jinja template string")


def check_template_name(choice: str) -> None:
    if choice != "auto" and choice not in TEMPLATES and "{%" not in choice and "{{" not in choice:
        raise ConfigError(f"task.chat_template = {choice!r}; allowed: auto (the tokenizer's), "
                          f"{', '.join(TEMPLATES)}, or a Jinja template string")


def normalize_messages(value, system_prompt: str | None = None) -> list[dict]:
    """OpenAI or ShareGPT messages as ``[{"role", "content"}]``; raises ``ValueError`` saying what
    is wrong (the loader adds the file and row). ``system_prompt`` is prepended when the
    conversation has no system message."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"messages must be a non-empty list of {{role, content}} objects, got {_short(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is {_short(m)}, not an object with role and content")
        if m.get("role") is not None:
            role, content = m.get("role"), m.get("content")
        elif m.get("from") is not None:
            role, content = SHAREGPT_ROLES.get(str(m["from"]).lower(), m["from"]), m.get("value")
        else:
            raise ValueError(f"message {i} has neither 'role' (OpenAI) nor 'from' (ShareGPT): {_short(m)}")
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {_short(content)}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("the conversation has no assistant message to train on")
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies (each with the
    template's end-of-turn text after it)."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = _render(tokenizer, messages[:i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ConfigError("the chat template does not render a conversation turn by turn (the text up to an "
                              "assistant reply is not a prefix of the whole), so the assistant tokens cannot be "
                              "located; set task.chat_template to chatml or alpaca")
        spans.append((len(before), len(through)))
    return full, spans


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels: the ids on assistant tokens, IGNORE
    elsewhere. A token belongs to a reply when it starts inside the reply's span."""
    text, spans = assistant_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [tok if any(s <= start < e for s, e in spans) and end > start else IGNORE
                  for tok, (start, end) in zip(ids, enc["offset_mapping"])]
        return ids, labels
    # Slow tokenizers have no offsets: tokenise the pieces between span boundaries separately.
    ids, labels, pos = [], [], 0
    for s, e in spans + [(len(text), len(text))]:
        for lo, hi, trained in ((pos, s, False), (s, e, True)):
            if hi > lo:
                piece = tokenizer(text[lo:hi], add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece if trained else [IGNORE] * len(piece)
        pos = e
    return ids, labels
