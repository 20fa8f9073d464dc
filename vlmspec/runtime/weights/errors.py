"""Stable error codes of the weights importer (E0580-E0587), one meaning each.

Kept in one table so the CLI, the docs and the tests name the same codes; `docs/weights.md` lists them.
"""

from __future__ import annotations

from typing import Any

from vlmspec.diagnostics import UserInputError, user_error

NO_FOLDER = "E0580"        # weights folder / config.json missing or unreadable
BAD_FILE = "E0581"         # a checkpoint file cannot be read (truncated shard, shard missing from the index)
PICKLE = "E0582"           # a pickle checkpoint (.bin / .pt) refused without allow_pickle
WRONG_FAMILY = "E0583"     # the checkpoint's family does not fit the component's kind
COVERAGE = "E0584"         # missing / shape-mismatched / unexpected keys
UNSUPPORTED = "E0585"      # import_hf: an architecture (or a setting of it) vlmspec cannot express
EXPORT = "E0586"           # export_hf: the model does not fit the target layout
DISAGREES = "E0587"        # a component's attribute differs from what its checkpoint's config says

CONVERT_HINT = ('convert it once: python -c "from transformers import AutoModel; '
                'AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"')


def weights_error(code: str, message: str, help: str | None = None, report: Any = None) -> UserInputError:
    """A one-line `UserInputError`; `report` (a CoverageReport) rides along as `.report` for callers to print."""
    err = user_error(code, message, help=help)
    err.report = report  # type: ignore[attr-defined]
    return err
