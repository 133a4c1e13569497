"""Library parameter names -> command-line flags, for the one-line error messages.

The library names the parameter an error is about in backticks (`guidance`, `trust_code`) and a
method option to set as `key=VALUE`; :func:`cli_message` shows the flag a user of the command line
types instead (``--guidance``, ``--trust-code``, ``--set key=VALUE``). So the library never names a
flag, and a renamed flag is changed here only.
"""

from __future__ import annotations

import re

# Library parameter -> the flag that sets it (every command uses the same flag for the same parameter).
FLAGS: dict[str, str] = {
    "batch_size": "--batch-size",
    "config": "--config",
    "decode": "--decode",
    "device": "--device",
    "eval_rows": "--eval",
    "feature_weights": "--feature-weights",
    "force": "--force",
    "guidance": "--guidance",
    "init_schedule": "--init",
    "metrics": "--metrics",
    "model": "--model",
    "n": "--n",
    "negative_prompt": "--negative-prompt",
    "out": "--out",
    "prompt_file": "--prompt-file",
    "prompts": "--prompt",
    "reference": "--reference",
    "resume": "--resume",
    "schedules": "--schedule",
    "seed": "--seed",
    "sets": "--set",
    "to": "--to",
    "trust_code": "--trust-code",
}

_NAMED = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)(=[^`\s]*)?`")


def cli_message(message: str) -> str:
    """``message`` with each `parameter` as its flag and each `key=VALUE` as ``--set key=VALUE``.

    >>> cli_message("`guidance` -1.0: expected a finite scale >= 0; or use `min_gap=X`")
    '--guidance -1.0: expected a finite scale >= 0; or use --set min_gap=X'
    """

    def flag(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if value is not None:
            return f"--set {name}{value}"
        return FLAGS.get(name, m.group(0))

    return _NAMED.sub(flag, message)
