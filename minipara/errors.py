"""One exception type for mistakes a user can fix; the CLIs print it as one line."""

import re


class UserError(Exception):
    """Bad input: a wrong path, a file that does not fit, an impossible option.

    The message says what is wrong and, where it helps, what to do about it, in the library's
    terms: an option is named as the Python parameter (`max_new_tokens`). `options` lists the
    parameter names the message mentions, so a command-line script can name its flags instead
    (`flag_message`). Scripts print it as `error: <message>` and exit with status 2.
    """

    def __init__(self, message: str, options: tuple[str, ...] = ()):
        super().__init__(message)
        self.options = tuple(options)

    def flag_message(self, flags: dict[str, str] | None = None) -> str:
        """The message with each option named as its command-line flag (`--max-new-tokens`);
        `flags` gives the spellings that are not simply `--` plus the name with dashes."""
        msg = str(self)
        for name in self.options:
            flag = (flags or {}).get(name) or "--" + name.replace("_", "-")
            # a whole word, not part of a path or file name (`runs/out/a.safetensors`, `train.jsonl`)
            msg = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w/-]|\.\w)", flag, msg)
        return msg
