"""What every chat platform shares, written once: how an answer's parts become one message,
splitting at a limit, the throttled editor, buttons and their short data, commands and
their help, the settings menu, and the flows themselves (``ChatBot``). A platform adapter
implements ``Platform`` and translates its events into ``ChatBot`` calls; nothing here
imports a platform library."""
