"""`vlm lsp`: a Language Server Protocol server for .vlm files (diagnostics, hover, completion, go to
definition, references, formatting, document symbols), built on pygls.

One module per job: `positions` (compiler spans <-> LSP ranges), `documents` (a document's text and
what the front end knows about it), `project` (the files it imports), `occurrences` (every name and
where it is written), `schema_info` (what the schema says about a field), then one module per feature,
and `server` to wire them. pygls is an optional extra (`pip install 'vlmspec[lsp]'`): importing this
package costs nothing until `main` runs.
"""

from __future__ import annotations

from vlmspec.diagnostics import user_error


def main() -> None:
    """Run the server on stdio; a missing pygls is a one-line error that says how to install it."""
    try:
        from vlmspec.lsp.server import serve
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        if missing not in ("pygls", "lsprotocol", "cattrs", "attrs"):
            raise
        raise user_error("E0005", f"`vlm lsp` needs {missing}, which is not installed",
                         help="pip install 'vlmspec[lsp]'") from None
    serve()
