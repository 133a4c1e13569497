"""Which model ids may load without the user's opt-in (``--trust-code``); imports no torch.

A schedule file is data that people download and share: the model it names must not run code
(``python:`` factories, ``edm:`` pickles) or read arbitrary paths unless the user opts in. Loaders
that run code need the opt-in wherever the id comes from; ids read from a file load without it
only when they are built in.
"""

from __future__ import annotations

import os

from stepopt.errors import StepoptError

# Loaders that run code named by their argument (unpickling, importing a module): they load only
# with trust_code=True (``--trust-code``), wherever the model id comes from.
CODE_LOADERS: dict[str, str] = {
    "edm": "unpickling runs code named by the checkpoint",
    "python": "it imports and runs a Python module",
}
TRUST_PARAM = "`trust_code`"  # the opt-in as errors name it (the command line shows --trust-code)
PUBLISHED_PREFIX = "published:"


def file_model_risk(model_id: str) -> str | None:
    """Why a model id read from a file needs ``trust_code`` to load, or None (built-in models)."""
    prefix, sep, _ = str(model_id).partition(":")
    if sep and prefix == "builtin":
        return None
    if prefix in CODE_LOADERS:
        return CODE_LOADERS[prefix]
    return "only built-in models load from a file's model id without it"


def check_file_model(
    model_id: str, source: str | os.PathLike[str], trust_code: bool, *, model_option: bool = True
) -> None:
    """Refuse a model id read from ``source`` (a schedule file) unless built-in or ``trust_code``.

    A schedule file is data that people share: the model it names must not run code (python:
    factories, pickles) or read arbitrary paths unless the user opts in.
    """
    risk = file_model_risk(model_id)
    if risk is None or trust_code or str(source).startswith(PUBLISHED_PREFIX):  # shipped files are part of stepopt
        return
    other = ", or name the model yourself with `model`" if model_option else ""
    raise StepoptError(
        f"{source}: model.id '{model_id}' is not a built-in model and loading it needs {TRUST_PARAM} ({risk});"
        f" pass {TRUST_PARAM} if you trust this file{other}"
    )


def check_code_loader(model_id: str, trust_code: bool) -> None:
    """Refuse a model id whose loader runs code (:data:`CODE_LOADERS`) unless ``trust_code``.

    This holds wherever the id comes from (the command line too); torch-free, so commands check it
    before any heavy import.
    """
    prefix = str(model_id).partition(":")[0]
    if prefix in CODE_LOADERS and not trust_code:
        raise StepoptError(
            f"model '{model_id}': refusing to load without {TRUST_PARAM} ({CODE_LOADERS[prefix]}; pass {TRUST_PARAM}"
            " only for code and checkpoints from a source you trust)"
        )
