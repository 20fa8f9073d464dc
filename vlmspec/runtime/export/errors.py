"""The export's user-facing errors (E0570-E0577): one line each, with a hint, never a traceback.

| code  | when |
|-------|------|
| E0570 | `tensorrt` asked for where CUDA or torch_tensorrt is missing (points at the ONNX artefact) |
| E0571 | a part of this model has no export path (the message says which part and why) |
| E0572 | a bad export option (format, max_len, dtype, quantization, max_batch) |
| E0573 | an optional dependency of one format is missing (onnx / onnxscript / onnxruntime / modelopt) |
| E0574 | an export folder that is not one, is incomplete, or whose spec no longer matches the manifest |
| E0575 | bad inputs to `ExportedModel` (prompt too long for the cache, image tokens, batch sizes) |
| E0576 | the exporter itself failed on this model (its first line is kept) |
"""

from __future__ import annotations

from vlmspec.diagnostics import UserInputError, user_error

TENSORRT_UNAVAILABLE = "E0570"
NOT_EXPORTABLE = "E0571"
BAD_OPTION = "E0572"
MISSING_DEPENDENCY = "E0573"
BAD_FOLDER = "E0574"
BAD_INPUT = "E0575"
EXPORTER_FAILED = "E0576"


def not_exportable(what: str, why: str, help: str | None = None) -> UserInputError:
    return user_error(NOT_EXPORTABLE, f"cannot export {what}: {why}", help=help)


def bad_option(message: str, help: str | None = None) -> UserInputError:
    return user_error(BAD_OPTION, message, help=help)


def missing(package: str, purpose: str, extra: str = "export") -> UserInputError:
    return user_error(MISSING_DEPENDENCY, f"{purpose} needs `{package}`, which is not installed",
                      help=f"pip install 'vlmspec[{extra}]'")


def bad_folder(message: str, help: str | None = None) -> UserInputError:
    return user_error(BAD_FOLDER, message, help=help)


def bad_input(message: str, help: str | None = None) -> UserInputError:
    return user_error(BAD_INPUT, message, help=help)


def exporter_failed(program: str, fmt: str, error: BaseException) -> UserInputError:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return user_error(EXPORTER_FAILED, f"{fmt} export of the {program} program failed: {first[:300]}",
                      help="this model uses an operation the exporter cannot trace; please report it with the "
                      "spec (torch.export.draft_export lists every problem at once)")
