"""The error every layer raises for a problem a user can act on."""


class RagError(Exception):
    """An error a user can act on; the CLI prints its message without a traceback."""
