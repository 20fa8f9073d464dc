"""Audio encoders (`audio` role): importing this package registers their builders."""

from vlmspec.runtime.audio import encoder  # noqa: F401  (registration)
