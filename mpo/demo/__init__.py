"""Built-in demo material: the synthetic shapes task (``mpo.demo.shapes``).

Kept free of imports so that ``python -m mpo.demo.shapes`` runs the module once, not twice.
"""
