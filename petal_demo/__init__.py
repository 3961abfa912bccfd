"""`make demo` (python -m petal_demo): the whole PETAL path on real faces, end to end.

Its own package because it drives training's data, the exporter and the runtime together; none of
those three needs to import it.
"""
