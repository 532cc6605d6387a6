"""The wiring and the lifecycle: ``service.py`` builds every part, starts them in
order and shuts them down in a fixed order; ``heap.py`` sets the garbage collector
for a per-record workload. The only folder that imports every other one.
"""
