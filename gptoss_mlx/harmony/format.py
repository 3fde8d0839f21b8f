"""The fixed words of the harmony format that rendering and parsing share."""

# Every assistant message names one of these channels (the system message lists them).
CHANNELS = ("analysis", "commentary", "final")
# Header markers as text: a header such as ``to=functions.f<|channel|>commentary <|constrain|>json``
# decodes to these, and a message's content type may start with the constrain marker.
CHANNEL = "<|channel|>"
CONSTRAIN = "<|constrain|>"
