"""The one exception type users see: its message says what was wrong and what to do."""


class GptOssError(Exception):
    """A problem with the user's input or environment (bad checkpoint, flag, model, memory).

    The CLI prints its message on one line and exits non-zero; library users catch it by type.
    """
