"""The project's own exception type for errors a user can cause.

Anything raised as :class:`ArSSRError` carries a one-line message that names the
input at fault and how to fix it; the CLI prints it without a traceback.
"""


class ArSSRError(Exception):
    """A user-caused error (bad file, bad scale, wrong weights, not enough memory)."""
