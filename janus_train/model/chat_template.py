"""The prompt format, once: the strings the sample builders train on and the Jinja chat template
generated from the same strings, so ``processor.apply_chat_template`` (HF users, ``janus-sample``)
renders exactly what a run trained.

Chat style (``U``/``A`` = ``User``/``Assistant`` or ``<|User|>``/``<|Assistant|>``)::

    [system "\\n\\n"] "U: " user "\\n\\n" "A:" " " answer EOS "U: " user "\\n\\n" "A:" ...

Plain style (stages 1 and 2, ``stage.und_format`` plain or qa; the papers' ``<image><caption>``,
``<image>Describe the image in detail.<caption>``, ``<question><answer>``)::

    user " " answer EOS user " " answer EOS ...     (no space after a message ending in an image)

no roles, no system prompt. Text-to-image prompts (``generation_mode="image"``) are framed by
their own style (``stage.gen_format``): chat ``"U: " prompt "\\n\\n" "A:"`` or plain ``prompt``,
never with a system prompt, and end with ``<begin_of_image>``. In HF message content an image entry renders as ``<image_placeholder>``
(which ``JanusProcessor`` expands to ``<begin_of_image>`` + N placeholders + ``<end_of_image>``,
the builders' image block), separated from its neighbours by ``"\\n"``; a string content's
``<image>`` markers (the training data's convention) render the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from janus_train.model.tokenizer import BOI_TOKEN, IMAGE_TOKEN

ROLES = {"janus": ("User", "Assistant"), "janus_pro": ("<|User|>", "<|Assistant|>")}
STYLES = ("chat", "qa", "plain")
"""Understanding styles (``stage.und_format``): qa renders as plain; evaluation asks a qa or
chat model questions and a plain (stage-1) model for captions."""
GEN_STYLES = ("chat", "plain")
IMAGE_MARKER = "<image>"
"""Where an image goes in a training conversation's text (LLaVA convention)."""
SYSTEM_END = "\n\n"
USER_END = "\n\n"
"""Between a user message and the assistant role."""
ANSWER_START = " "
"""Between the assistant role's colon and the answer."""
IMAGE_SEP = "\n"
"""Between an image entry of HF message content and its neighbouring entries."""
SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
"""DeepSeek's default system prompt of understanding conversations (``processing_vlm.py``
``VLChatProcessor.system_prompt``); text-to-image prompts have none."""


def user_prefix(template: str) -> str:
    return f"{ROLES[template][0]}: "


def assistant_header(template: str) -> str:
    return f"{ROLES[template][1]}:"


def user_turn(template: str, text: str) -> str:
    """One user message up to where the answer starts: ``"U: text\\n\\nA:"``."""
    return user_prefix(template) + text + USER_END + assistant_header(template)


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are framed: ``chat`` with a template's roles and a system prompt, or
    ``plain`` / ``qa`` (no roles, no system prompt; stages 1 and 2); text-to-image prompts by
    ``gen_style`` (default: chat for a chat style, else plain)."""

    style: str = "chat"
    chat_template: str = "janus_pro"
    system_prompt: str | None = SYSTEM_PROMPT
    """None or '': none. Stripped, as DeepSeek's template strips every message."""
    gen_style: str | None = None
    """Text-to-image prompts: ``chat`` | ``plain`` (None: follows ``style``)."""

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"prompt style {self.style!r}: one of {STYLES}")
        if self.gen_style is None:
            object.__setattr__(self, "gen_style", "chat" if self.style == "chat" else "plain")
        if self.gen_style not in GEN_STYLES:
            raise ValueError(f"text-to-image prompt style {self.gen_style!r}: one of {GEN_STYLES}")
        if self.chat_template not in ROLES:
            raise ValueError(f"chat template {self.chat_template!r}: one of {sorted(ROLES)}")

    def jinja(self) -> str:
        return jinja_template(self)


def _lit(s: str) -> str:
    """A Jinja string literal (JSON escapes are valid Jinja escapes)."""
    return json.dumps(s, ensure_ascii=False)


# Renders one message's content: a string (``<image>`` markers -> placeholder) or HF entries.
_CONTENT_MACRO = """\
{%- macro content_text(content) -%}
{%- if content is string -%}
{{- content | replace(IMAGE_MARKER, IMAGE_TOKEN) -}}
{%- else -%}
{%- for c in content -%}
{%- if not loop.first -%}
{{- IMAGE_SEP if (c['type'] == 'image' or content[loop.index0 - 1]['type'] == 'image') else ' ' -}}
{%- endif -%}
{%- if c['type'] == 'image' -%}{{ IMAGE_TOKEN }}{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
"""

_CHAT = """\
{%- set image_mode = generation_mode is defined and generation_mode == 'image' -%}
{%- set ns = namespace(system=SYSTEM_PROMPT, first=0, expect='user') -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set ns.system = content_text(messages[0]['content']) | trim -%}
{%- set ns.first = 1 -%}
{%- endif -%}
{%- if ns.system and not image_mode -%}{{ ns.system ~ SYSTEM_END }}{%- endif -%}
{%- for m in messages[ns.first:] -%}
{%- if m['role'] != ns.expect -%}
{{- raise_exception('expected a ' ~ ns.expect ~ ' message, got ' ~ m['role']) -}}
{%- endif -%}
{%- if m['role'] == 'user' -%}
{{- USER_PREFIX ~ (content_text(m['content']) | trim) -}}
{%- if not loop.last or add_generation_prompt -%}{{ USER_END }}{%- endif -%}
{%- set ns.expect = 'assistant' -%}
{%- else -%}
{{- ASSISTANT_HEADER -}}
{%- generation -%}{{ ANSWER_START ~ (content_text(m['content']) | trim) ~ eos_token }}{%- endgeneration -%}
{%- set ns.expect = 'user' -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and ns.expect == 'assistant' -%}
{{- ASSISTANT_HEADER -}}{%- if image_mode -%}{{ BOI_TOKEN }}{%- endif -%}
{%- endif -%}
"""

# ``ns.sep``: the answer's leading space, none after a message that is empty or ends in an image.
_PLAIN = """\
{%- set image_mode = generation_mode is defined and generation_mode == 'image' -%}
{%- set ns = namespace(sep='') -%}
{%- for m in messages -%}
{%- if m['role'] == 'user' -%}
{%- set t = content_text(m['content']) | trim -%}
{{- t -}}
{%- set ns.sep = '' if (not t or t.endswith(IMAGE_TOKEN)) else ANSWER_START -%}
{%- elif m['role'] == 'assistant' -%}
{%- generation -%}{{ ns.sep ~ (content_text(m['content']) | trim) ~ eos_token }}{%- endgeneration -%}
{%- set ns.sep = '' -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and image_mode -%}{{ BOI_TOKEN }}{%- endif -%}
"""


def jinja_template(fmt: PromptFormat) -> str:
    """Jinja source of ``fmt``'s chat template (HF ``chat_template``), built from the strings the
    sample builders use. Template variables: ``messages``, ``add_generation_prompt``,
    ``eos_token`` and, for text-to-image prompts, ``generation_mode="image"``."""
    consts = {
        "IMAGE_MARKER": IMAGE_MARKER,
        "IMAGE_TOKEN": IMAGE_TOKEN,
        "IMAGE_SEP": IMAGE_SEP,
        "BOI_TOKEN": BOI_TOKEN,
        "ANSWER_START": ANSWER_START,
    }
    und_chat, gen_chat = fmt.style == "chat", fmt.gen_style == "chat"
    if und_chat or gen_chat:
        consts.update(
            SYSTEM_PROMPT=(fmt.system_prompt or "").strip(),
            SYSTEM_END=SYSTEM_END,
            USER_PREFIX=user_prefix(fmt.chat_template),
            USER_END=USER_END,
            ASSISTANT_HEADER=assistant_header(fmt.chat_template),
        )
    und, gen = (_CHAT if und_chat else _PLAIN), (_CHAT if gen_chat else _PLAIN)
    body = und
    if und is not gen:  # text-to-image prompts framed apart from understanding
        body = (
            "{%- if generation_mode is defined and generation_mode == 'image' -%}\n"
            + gen
            + "{%- else -%}\n"
            + und
            + "{%- endif -%}\n"
        )
    name = f"chat format ({fmt.chat_template})" if und_chat else f"{fmt.style} format"
    if und is not gen:
        name += f", {fmt.gen_style} text-to-image prompts"
        if gen_chat:
            name += f" ({fmt.chat_template})"
    head = f"{{#- janus_train {name}: generated by janus_train.model.chat_template -#}}\n"
    sets = "".join(f"{{%- set {k} = {_lit(v)} -%}}\n" for k, v in consts.items())
    return head + sets + _CONTENT_MACRO + body


# Conversations on which a processor's own template must render the trained format to be kept.
_PROBES = (
    ("text", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]),
    (
        "text",
        [
            {"role": "user", "content": [{"type": "text", "text": "Q?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "R?"}]},
        ],
    ),
    ("image", [{"role": "user", "content": [{"type": "text", "text": "a red circle."}]}]),
)


def _effective_prompt(
    processor, template: str, messages: list, mode: str, default_system: bool
) -> str:
    """The text ``processor(text=apply_chat_template(...), generation_mode=mode)`` tokenizes
    (before BOS): HF's default system prompt in text mode, <begin_of_image> in image mode."""
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    text = processor.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, generation_mode=mode
    )
    if mode == "image":
        return text.removesuffix(BOI_TOKEN) + BOI_TOKEN
    return (DEFAULT_SYSTEM_PROMPT if default_system else "") + text


def renders_format(processor, fmt: PromptFormat) -> bool:
    """True when the processor's own chat template (with its ``use_default_system_prompt``)
    renders ``fmt`` on the probe conversations, understanding and text-to-image."""
    own = getattr(processor, "chat_template", None)
    if not own:
        return False
    default_system = bool(getattr(processor, "use_default_system_prompt", False))
    try:
        return all(
            _effective_prompt(processor, own, m, mode, default_system)
            == _effective_prompt(processor, fmt.jinja(), m, mode, False)
            for mode, m in _PROBES
        )
    except Exception:  # a template that cannot render these shapes is not the trained format
        return False


def set_chat_template(processor, fmt: PromptFormat) -> bool:
    """Give ``processor`` (and its tokenizer) the chat template of ``fmt``, unless its own
    template (a released checkpoint's) already renders ``fmt``. Returns True when replaced."""
    if renders_format(processor, fmt):
        return False
    processor.chat_template = fmt.jinja()
    processor.tokenizer.chat_template = processor.chat_template
    # Our template renders the system prompt itself; HF's default one would come twice.
    processor.use_default_system_prompt = False
    return True
