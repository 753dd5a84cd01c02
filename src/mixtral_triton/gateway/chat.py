"""The checkpoint's chat template (tokenizer_config.json `chat_template`), rendered with
transformers' apply_chat_template into the prompt text the ensemble tokenizes.

A base model has no template: chat is then refused with a 400 naming `messages`, never
guessed. The Triton tokenizer model adds the BOS token itself (the repository's
`add_special_tokens`, true by default), so a template's leading BOS text is dropped here
rather than sent twice.
"""

from __future__ import annotations

from pathlib import Path

from mixtral_triton.errors import UserError
from mixtral_triton.protocol import RequestError

NO_TOKENIZER = ("chat needs the model's chat template, and this gateway was started without "
                "--tokenizer-dir: use /v1/completions or /predict, or restart it with "
                "--tokenizer-dir <the checkpoint folder>")


class ChatTemplate:
    def __init__(self, tokenizer_dir: Path | None):
        self.tokenizer = None
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        if tokenizer_dir is None:
            return
        if not self.tokenizer_dir.is_dir():
            raise UserError(f"--tokenizer-dir {tokenizer_dir} is not a folder")
        from transformers import AutoTokenizer  # slow import: only when there is a tokenizer
        try:  # local files only, never remote code: the folder is the served checkpoint
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True,
                                                           trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"--tokenizer-dir {tokenizer_dir}: no tokenizer there ({exc})") from None
        self._bos = self.tokenizer.bos_token
        bos_id = self.tokenizer.bos_token_id
        self._strip_bos = bool(self._bos) and bos_id is not None and \
            self.tokenizer.encode("x")[:1] == [bos_id]

    @property
    def available(self) -> bool:
        return self.tokenizer is not None and bool(self.tokenizer.chat_template)

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages`; RequestError("messages", ...) when there is no template
        or the template refuses the conversation (e.g. roles that do not alternate)."""
        if self.tokenizer is None:
            raise RequestError("messages", NO_TOKENIZER)
        if not self.tokenizer.chat_template:
            raise RequestError("messages", f"the model's tokenizer ({self.tokenizer_dir.name}) has "
                               "no chat template (a base model, not an Instruct one): use "
                               "/v1/completions or /predict with the prompt as text")
        from jinja2 import TemplateError

        try:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=True)
        except TemplateError as exc:
            raise RequestError("messages", f"the chat template refused the messages: {exc}") from None
        if self._strip_bos and prompt.startswith(self._bos):
            prompt = prompt[len(self._bos):]
        return prompt
