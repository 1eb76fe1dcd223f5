"""Root of the three tiers. Nothing here imports the engine or the HTTP layer, so the unit tier stays light:

- ``tests/unit``: pure logic, no model, no llama_cpp import; seconds.
- ``tests/integration``: the real engine on the real embedded model, through real uvicorn on loopback.
- ``tests/system``: soak, load, fuzz, CPU contention and the Molecule scenarios (marked ``system`` or ``molecule``).
"""
