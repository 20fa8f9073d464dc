"""The chat templates `vlm export-hf` writes for a spec that has none of its own.

Every one walks the conversation alike: a message's text parts joined by "\\n" (as `vlm serve` joins
them), its image parts counted, a system message kept for the user turns that follow, and each assistant
message written as the spec's `answer` with `{a}` replaced, then eos unless it already ends with it. What
differs between formats is only how a user turn is laid out, because their processors add different
things themselves (BLIP-2 the image placeholders in front, PaliGemma BOS after them and a newline,
IDEFICS BOS and the fake tokens around each image): each format passes that piece of Jinja here.
Literals are JSON strings, which Jinja's string literals read alike.
"""

from __future__ import annotations

import json
from typing import Any

_LOOP = """{%- for message in messages -%}
{%- if message['content'] is string -%}
{%- set parts = [{'type': 'text', 'text': message['content']}] -%}
{%- else -%}
{%- set parts = message['content'] or [] -%}
{%- endif -%}
{%- set text = parts | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}
{%- set n_images = parts | selectattr('type', 'equalto', 'image') | list | length -%}
{%- if message['role'] == 'system' -%}
{%- set ns.system = text -%}
{%- elif message['role'] == 'user' -%}
USER_TURN
{%- elif message['role'] == 'assistant' -%}
{%- set reply = answer | replace('{a}', text) -%}
{{- reply -}}
{%- if eos_token is defined and eos_token and not reply.endswith(eos_token) -%}{{ eos_token }}{%- endif -%}
{%- endif -%}
{%- endfor -%}
"""

#: a user turn as `Processor.prompt_text` lays it out: the system text and "\\n", then `prompt` with
#: `{image}` -> one `image_token` per image part (the HF processor expands each) and `{q}` -> the text
PROMPT_TURN = """{%- if ns.system -%}{{ ns.system ~ '\\n' }}{%- endif -%}
{{- prompt | replace('{image}', image_token * n_images) | replace('{q}', text) -}}"""


def conversation_template(note: str, user_turn: str, values: dict[str, Any], *, system: str | None = None,
                          bos_first: bool = False) -> str:
    """A template whose user turns are `user_turn` (Jinja over `text`, `n_images`, `ns.system`, `ns.first`
    and the `values`, each set as a variable of its lower-cased name); `system`: the spec's system text
    (a system message replaces it); `bos_first`: the template writes the BOS token first (the format's
    processor does not)."""
    lines = [f"{{#- written by `vlm export-hf`: {note} -#}}"]
    lines += [f"{{%- set {name.lower()} = {json.dumps(value, ensure_ascii=False)} -%}}" for name, value in values.items()]
    lines.append(f"{{%- set ns = namespace(first=true, system={json.dumps(system, ensure_ascii=False) if system else 'none'}) -%}}")
    if bos_first:
        lines.append("{%- if bos_token is defined and bos_token -%}{{ bos_token }}{%- endif -%}")
    return "\n".join(lines) + "\n" + _LOOP.replace("USER_TURN", user_turn)
