"""Chat templates for a Gemma base whose tokenizer carries none (the pretrained `-pt` models the frontend
offers beside the `-it` ones, and Gemma 3 270M): its own family's turn format. Gemma 4's is the template TRL
ships for it (<|turn>user ... <turn|> then <|turn>model); Gemma 3's is here (<start_of_turn>user ...
<end_of_turn> then <start_of_turn>model), as the instruction-tuned models and the platform's Unsloth inference
path (its get_chat_template "gemma-3") render them. The template is saved with every export, so what serves
the model renders prompts as it was trained."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Gemma 3's chat template: system text folded into the first user turn, assistant shown as 'model'.
GEMMA3_TEXT = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# The same with the image branch: an image part becomes <start_of_image>, which the processor expands.
GEMMA3 = GEMMA3_TEXT.replace(
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}",
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}").replace(
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}",
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}")

# Gemma 3n's: Gemma 3's turns, an image part <image_soft_token> and an audio part <audio_soft_token> (its processor
# expands each), as google/gemma-3n-E2B-it ships it.
GEMMA3N = GEMMA3.replace("{{ '<start_of_image>' }}", "{{ '<image_soft_token>' }}").replace(
    "{%- elif item['type'] == 'text' -%}", "{%- elif item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}"
    "{%- elif item['type'] == 'text' -%}")

TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
GEMMA4_TURN_TOKENS = ("<|turn>", "<turn|>")


def family_template(tokenizer, processor=None) -> tuple[str, str] | None:
    """(template, its name) of the Gemma family whose turn tokens the tokenizer has: Gemma 4's (<|turn>role ...
    <turn|>, the template TRL ships for it, as E2B's tokenizer carries it), else Gemma 3's (for images, with the
    picture's mark that the processor expands: Gemma 3n's <image_soft_token>, Gemma 3's <start_of_image>); None
    for neither."""
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in GEMMA4_TURN_TOKENS):
        from trl.chat_template_utils import gemma4_chat_template

        return gemma4_chat_template, "Gemma 4's"
    if all(t in vocab for t in TURN_TOKENS):
        if processor is None:
            return GEMMA3_TEXT, "Gemma 3's"
        return (GEMMA3N, "Gemma 3n's") if type(processor).__name__ == "Gemma3nProcessor" else (GEMMA3, "Gemma 3's")
    return None


def ensure_chat_template(tokenizer, model_id: str, processor=None) -> str | None:
    """Give a Gemma base without a chat template its own family's (family_template: Gemma 4's for Gemma 4, Gemma
    3's otherwise, Gemma 3n's for Gemma 3n's images; for images, its processor's too); what was done, for the job document, or None where the
    base has its own. A tokenizer without Gemma's turn tokens is left as it is: its conversations are refused
    when they are rendered (data.require_chat_template), and plain-text rows need no template."""
    target = processor or tokenizer
    if getattr(target, "chat_template", None):
        return None
    found = family_template(tokenizer, processor)
    if found is None:
        return None
    target.chat_template, name = found
    if processor and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = target.chat_template
    note = (f"{model_id!r} has no chat template (a pretrained base): conversations are rendered in {name} "
            "turn format, and that template is saved with the exports")
    logger.warning("%s", note)
    return note
