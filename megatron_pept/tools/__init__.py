"""The command-line tools, installed as console scripts (``megatron-pept-prepare-data`` ...).

Each module has ``build_parser()`` and ``main(argv=None, prog=...)``; ``tools/<name>.py`` in a checkout is a thin
wrapper that calls the same ``main`` under its old program name, so both spellings behave alike.
"""
