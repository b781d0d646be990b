"""Chat and instruction formats: the labels mask exactly the assistant tokens (checked token by
token against hand-built expectations), multi-turn, system prompts, named templates, and the
length limit that never cuts an answer silently."""
import logging

import pytest

from sparse_ft.errors import ConfigError
from sparse_ft.tasks import get_task
from sparse_ft.tasks.chat import encode_chat, normalize_messages, set_chat_template
from sparse_ft.tasks.encode import IGNORE, encode_training_set
from helpers import make_chat_tokenizer

X = IGNORE


def expect(tok, pieces):
    """``pieces``: (space-separated tokens, trained?) -> the ids and labels the encoder must give."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tok.convert_tokens_to_ids(text.split())
        assert tok.unk_token_id not in piece, text
        ids += piece
        labels += piece if trained else [X] * len(piece)
    return ids, labels


def encode(tok, task_name, row, **options):
    ex = get_task(task_name, **options).example(row)
    return encode_chat(tok, ex.messages)


def test_alpaca_trains_on_the_output_only():
    tok = make_chat_tokenizer()
    got = encode(tok, "alpaca", {"instruction": "add numbers", "input": "two plus two", "output": "four"})
    assert got == expect(tok, [("<|user|> add numbers two plus two <|end|> <|assistant|>", False),
                               ("four <|end|>", True)])
    # No input: the instruction alone is the user turn.
    got = encode(tok, "alpaca", {"instruction": "hi there", "input": "", "output": "hello"})
    assert got == expect(tok, [("<|user|> hi there <|end|> <|assistant|>", False), ("hello <|end|>", True)])


def test_multi_turn_trains_every_assistant_turn_and_system_prompt_is_masked():
    tok = make_chat_tokenizer()
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"},
                {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine thanks"}]
    got = encode(tok, "messages", {"messages": messages}, system_prompt="be brief")
    assert got == expect(tok, [("<|system|> be brief <|end|> <|user|> hi there <|end|> <|assistant|>", False),
                               ("hello you <|end|>", True),
                               ("<|user|> how are you <|end|> <|assistant|>", False),
                               ("fine thanks <|end|>", True)])
    # A conversation with its own system message keeps it (the option only fills in a missing one).
    own = [{"role": "system", "content": "hi"}] + messages[:2]
    got = encode(tok, "messages", {"messages": own}, system_prompt="be brief")
    assert got == expect(tok, [("<|system|> hi <|end|> <|user|> hi there <|end|> <|assistant|>", False),
                               ("hello you <|end|>", True)])
    # The alpaca format takes the system prompt too.
    got = encode(tok, "alpaca", {"instruction": "hi", "output": "hello"}, system_prompt="be brief")
    assert got == expect(tok, [("<|system|> be brief <|end|> <|user|> hi <|end|> <|assistant|>", False),
                               ("hello <|end|>", True)])


def test_sharegpt_spelling_equals_openai():
    openai = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    assert normalize_messages(sharegpt) == normalize_messages(openai) == openai


def test_named_template_when_the_tokenizer_has_none():
    tok = make_chat_tokenizer(chat_template=None)
    with pytest.raises(ConfigError, match="no chat template; set task.chat_template"):
        set_chat_template(tok, "auto")
    set_chat_template(tok, "chatml")
    got = encode(tok, "messages", {"messages": [{"role": "user", "content": "hi there"},
                                                {"role": "assistant", "content": "hello"}]})
    assert got == expect(tok, [("<|im_start|> user hi there <|im_end|> <|im_start|> assistant", False),
                               ("hello <|im_end|>", True)])
    with pytest.raises(ConfigError, match="task.chat_template = 'vicuna'; allowed: auto"):
        set_chat_template(tok, "vicuna")


def test_template_that_is_not_incremental_is_refused():
    # Renders the last message first: the text up to a reply is not a prefix of the whole.
    tok = make_chat_tokenizer(chat_template="{% for m in messages|reverse %}{{ m['content'] + ' ' }}{% endfor %}")
    with pytest.raises(ConfigError, match="turn by turn"):
        encode(tok, "messages", {"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]})


@pytest.mark.parametrize("bad, message", [
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "role 'robot'"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "content must be a string"),
    ("hi", "non-empty list"),
])
def test_malformed_messages_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        normalize_messages(bad)


def _long_examples(tok):
    task = get_task("messages")
    short = task.example({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    long_prompt = task.example({"messages": [{"role": "user", "content": "one two three four five six seven"},
                                             {"role": "assistant", "content": "sum"}]})
    long_answer = task.example({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "one two three four five six seven"}]})
    return short, long_prompt, long_answer


def test_over_long_example_keeps_its_answer_or_is_dropped(caplog):
    tok = make_chat_tokenizer()
    short, long_prompt, long_answer = _long_examples(tok)
    # long_prompt is 12 tokens: <|user|> + 7 words + <|end|> + <|assistant|> | sum <|end|>
    caplog.set_level(logging.WARNING, logger="sparse_ft")
    out, rep = encode_training_set(tok, [short, long_prompt, long_answer], 8, add_eos=True, truncation="left")
    assert (rep.total, rep.prompt_cut, rep.dropped) == (3, 1, 1)
    assert out[0] == encode_chat(tok, short.messages)
    # The prompt lost its first 4 tokens; the answer and its end marker are whole and trained.
    assert out[1] == expect(tok, [("four five six seven <|end|> <|assistant|>", False), ("sum <|end|>", True)])
    assert "2 of 3 training examples exceed task.max_length=8: 1 had their prompt cut" in caplog.text

    out, rep = encode_training_set(tok, [short, long_prompt, long_answer], 8, add_eos=True, truncation="drop")
    assert (rep.prompt_cut, rep.dropped) == (0, 2) and out == [encode_chat(tok, short.messages)]

    with pytest.raises(ConfigError, match="all 1 training examples exceed task.max_length=8"):
        encode_training_set(tok, [long_answer], 8, add_eos=True, truncation="left")


def test_multi_turn_cut_from_the_left_keeps_the_last_answer():
    tok = make_chat_tokenizer()
    ex = get_task("messages").example({"messages": [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"},
        {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine thanks"}]})
    out, rep = encode_training_set(tok, [ex], 10, add_eos=True)
    assert rep.prompt_cut == 1
    # The first reply lost its words but what is left of it (its end marker) is still trained.
    assert out[0] == expect(tok, [("<|end|>", True), ("<|user|> how are you <|end|> <|assistant|>", False),
                                  ("fine thanks <|end|>", True)])
