"""Prompt templates and verbalisers, in the style of the MeZO few-shot setup (Malladi et al. 2023)
that paper 002 follows. Classification options carry their leading space or newline-free text;
the prediction is the option with the highest mean log-likelihood per token.
"""
from __future__ import annotations

from .base import Example, Task


class SST2(Task):
    name = "sst2"
    hub_path, hub_name = "glue", "sst2"
    columns = ("sentence", "label")
    verbalizer = (" terrible", " great")

    def example(self, row):
        prompt = f"{row['sentence'].strip()} It was"
        return Example(prompt, self.verbalizer[row["label"]], list(self.verbalizer), row["label"])


class RTE(Task):
    name = "rte"
    hub_path, hub_name = "super_glue", "rte"
    columns = ("premise", "hypothesis", "label")
    verbalizer = ("Yes", "No")  # 0 entailment, 1 not_entailment

    def example(self, row):
        prompt = f"{row['premise']}\nDoes this mean that \"{row['hypothesis']}\" is true? Yes or No?\n"
        return Example(prompt, self.verbalizer[row["label"]], list(self.verbalizer), row["label"])


class CB(Task):
    name = "cb"
    hub_path, hub_name = "super_glue", "cb"
    columns = ("premise", "hypothesis", "label")
    verbalizer = ("Yes", "No", "Maybe")  # entailment, contradiction, neutral

    def example(self, row):
        prompt = f"Suppose {row['premise']} Can we infer that \"{row['hypothesis']}\"? Yes, No, or Maybe?\n"
        return Example(prompt, self.verbalizer[row["label"]], list(self.verbalizer), row["label"])


class BoolQ(Task):
    name = "boolq"
    hub_path, hub_name = "super_glue", "boolq"
    columns = ("passage", "question", "label")
    verbalizer = ("No", "Yes")

    def example(self, row):
        prompt = f"{row['passage']} {row['question']}?\n"
        return Example(prompt, self.verbalizer[row["label"]], list(self.verbalizer), row["label"])


class WSC(Task):
    name = "wsc"
    hub_path, hub_name = "super_glue", "wsc.fixed"
    columns = ("text", "span1_text", "span2_text", "label")
    verbalizer = ("No", "Yes")

    def example(self, row):
        prompt = (f"{row['text']}\nIn the previous sentence, does the pronoun \"{row['span2_text'].lower()}\" "
                  f"refer to {row['span1_text']}? Yes or No?\n")
        return Example(prompt, self.verbalizer[row["label"]], list(self.verbalizer), row["label"])


class WiC(Task):
    name = "wic"
    hub_path, hub_name = "super_glue", "wic"
    columns = ("word", "sentence1", "sentence2", "label")
    verbalizer = ("No", "Yes")

    def example(self, row):
        prompt = (f"Does the word \"{row['word']}\" have the same meaning in these two sentences? Yes, No?\n"
                  f"{row['sentence1']}\n{row['sentence2']}\n")
        return Example(prompt, self.verbalizer[row["label"]], list(self.verbalizer), row["label"])


class MultiRC(Task):
    name = "multirc"
    hub_path, hub_name = "super_glue", "multirc"
    columns = ("paragraph", "question", "answer", "label")
    verbalizer = ("No", "Yes")

    def example(self, row):
        prompt = (f"{row['paragraph']}\nQuestion: {row['question']}\n"
                  f"I found this answer \"{row['answer']}\". Is that correct? Yes or No?\n")
        return Example(prompt, self.verbalizer[row["label"]], list(self.verbalizer), row["label"])


class COPA(Task):
    name = "copa"
    hub_path, hub_name = "super_glue", "copa"
    columns = ("premise", "choice1", "choice2", "question", "label")

    @staticmethod
    def _choice(text: str) -> str:
        text = text.strip()
        return " " + text[0].lower() + text[1:]

    def example(self, row):
        joiner = " because" if row["question"] == "cause" else " so"
        prompt = row["premise"].strip().rstrip(".") + joiner
        options = [self._choice(row["choice1"]), self._choice(row["choice2"])]
        return Example(prompt, options[row["label"]], options, row["label"])


class ReCoRD(Task):
    name = "record"
    hub_path, hub_name = "super_glue", "record"
    columns = ("passage", "query", "entities", "answers")

    def example(self, row):
        passage = row["passage"].replace("@highlight\n", "- ")
        before, _, after = row["query"].partition("@placeholder")
        prompt = f"{passage}\n{before}".rstrip(" ")
        entities = list(dict.fromkeys(row["entities"]))
        options = [(" " if before.endswith(" ") or not before else "") + e + after for e in entities]
        correct = [i for i, e in enumerate(entities) if e in set(row["answers"])]
        if not correct:
            correct = [0]
        return Example(prompt, options[correct[0]], options, correct)


class SQuAD(Task):
    name = "squad"
    kind = "generation"
    hub_path, hub_name = "squad", None
    columns = ("context", "question", "answers")

    def example(self, row):
        answers = list(row["answers"]["text"])
        prompt = f"Title: {row.get('title', '')}\nContext: {row['context']}\nQuestion: {row['question']}\nAnswer:"
        return Example(prompt, " " + answers[0], answers=answers)


class DROP(Task):
    name = "drop"
    kind = "generation"
    hub_path, hub_name = "drop", None
    columns = ("passage", "question", "answers_spans")

    def example(self, row):
        answers = list(row["answers_spans"]["spans"])
        prompt = f"Passage: {row['passage']}\nQuestion: {row['question']}\nAnswer:"
        return Example(prompt, " " + answers[0], answers=answers)


class Instruction(Task):
    """The user's own data: jsonl rows with a prompt and a response (field names configurable).

    Trained on response tokens only; evaluated by the mean loss on response tokens.
    """

    name = "instruction"
    kind = "language_modeling"

    @property
    def columns(self):
        return (self.options.get("prompt_field", "prompt"), self.options.get("response_field", "response"))

    def example(self, row):
        prompt_field, response_field = self.columns
        return Example(row[prompt_field], row[response_field])


def _text(row: dict, column: str, optional: bool = False) -> str:
    value = row.get(column)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"column {column!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


class Alpaca(Task):
    """Instruction data in the Alpaca layout: ``instruction``, optional ``input``, ``output``.

    Rendered as a user turn (the instruction, then the input after a blank line) and an assistant
    turn (the output) with the chat template; trained on the output only, evaluated by its loss.
    """

    name = "alpaca"
    kind = "language_modeling"
    chat = True
    columns = ("instruction", "output")

    def example(self, row):
        user = _text(row, "instruction")
        extra = _text(row, "input", optional=True)
        if extra.strip():
            user = f"{user}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
        system = self.options.get("system_prompt")
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return Example(user, messages[-1]["content"], messages=messages)


class Messages(Task):
    """Conversations: a ``messages`` column of OpenAI ``{role, content}`` messages (or ShareGPT
    ``{from, value}``), rendered with the chat template; every assistant turn is trained."""

    name = "messages"
    kind = "language_modeling"
    chat = True
    columns = ("messages",)

    def example(self, row):
        from .chat import normalize_messages

        messages = normalize_messages(row.get("messages"), self.options.get("system_prompt"))
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return Example(messages[last - 1]["content"] if last else "", messages[last]["content"], messages=messages)


ALL = (SST2, RTE, CB, BoolQ, WSC, WiC, MultiRC, COPA, ReCoRD, SQuAD, DROP, Instruction, Alpaca, Messages)
