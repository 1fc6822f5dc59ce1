"""The one exception type the command line turns into a single clear line and a non-zero exit."""


class IntrospectError(ValueError):
    """Bad input: the message names the field and the fix."""
