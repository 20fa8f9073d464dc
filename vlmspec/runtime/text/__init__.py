"""Text towers (`text` role): importing this package registers their builders."""

from vlmspec.runtime.text import towers  # noqa: F401  (registration)
