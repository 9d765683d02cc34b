"""Lowering: from the checked AST to the IR graph.

``lower.py`` walks a program (names, ``param``\\ s, the caller's bindings, ``def``\\ s, sweeps);
``builtins.py`` is the table of the language's functions, each saying its parameters and how it
lowers, seen through a small protocol so the table never imports the walk; ``methods.py`` writes
the merge methods from primitives; ``adapters.py`` reads ``as_lora(...)`` outputs off the program.
The kind rules (model, task vector, number) live below, in :mod:`tvlang.check`: the IR's builder
applies them to every node.
"""
