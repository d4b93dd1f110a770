"""The application: configuration, wiring, the daemon's lifecycle, the CLI.

The application: configuration read and validated once (``config``), the wiring that builds
every part from settings (``wiring``), the daemon's lifecycle (``daemon``), native thread caps
(``threads``) and the command line (``cli``).

The only layer that sees the settings object; it hands plain values and typed parts downwards.
May import everything below it.
"""
