"""The generated CRDs, shipped with the package (``cn2mirror.crds``): file mode validates
objects against them as the API server would (agent/admission.py)."""
