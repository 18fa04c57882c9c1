"""The command lines, above the library: each module parses its arguments and wires library
functions into one program (``janus-data``, ``janus-plan``, ``janus-sample``, ``python -m
janus_train.cli.check``); nothing in the library imports this package (``tests/test_structure.py``).
``janus-train`` is ``janus_train/train.py``, the training app with its loop written out."""
