"""A small, offline reproduction of Ilharco et al., *Editing Models with Task Arithmetic*
(ICLR 2023) -- negation, addition and analogy -- on scikit-learn's bundled digits, with
every weight edit written as a tvlang expression.  Run it with ``python -m examples.paper``."""
