"""lsun-hitl: large labeled image datasets with deep learning and humans in the loop (the LSUN cascade).

The library holds the domain logic and knows nothing of Prefect; ``tasks/`` and ``flows/`` wrap it.
"""

__version__ = "0.1.0"
