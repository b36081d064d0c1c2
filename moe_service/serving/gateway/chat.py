"""Chat prompts: a checkpoint's `chat_template` (tokenizer_config.json) rendered as transformers renders
it, or a plain template for a model without one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

# For a model whose tokenizer_config.json has no chat_template (the presets): one line per message, then
# the cue for the assistant's turn. The tokenizer adds BOS as for any text prompt.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatError(ValueError):
    """Messages the template cannot render (the client's fault: a 400)."""


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass
class ChatTemplate:
    source: str
    bos_token: str | None = None
    eos_token: str | None = None
    from_checkpoint: bool = False  # its text carries the special tokens itself: no BOS is added on encoding

    @classmethod
    def load(cls, model: object) -> "ChatTemplate":
        """The checkpoint directory's template (the one named "default" if there are several), else plain."""
        from moe_service.checkpoint.sources import checkpoint_dir

        directory = checkpoint_dir(model)
        path = directory / "tokenizer_config.json" if directory is not None else None
        if path is not None and path.is_file():
            cfg = json.loads(path.read_text())
            tpl = cfg.get("chat_template")
            if isinstance(tpl, list):
                tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
            if tpl is None and (path.parent / "chat_template.jinja").is_file():
                tpl = (path.parent / "chat_template.jinja").read_text()
            if tpl:
                return cls(tpl, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")), True)
        return cls(PLAIN_TEMPLATE)

    def __post_init__(self) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        # as transformers compiles a chat template: templates from the Hub are untrusted code
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(self.source)

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages` (dicts with role and content), ending with the assistant's cue."""
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.exceptions.TemplateError as e:
            raise ChatError(f"the chat template refused the messages: {e}") from None
