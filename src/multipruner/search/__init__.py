"""The greedy search: its settings and stages, calibration sets, and the scorer built from parts
(recorder, objective, tails, reuse, layer-major, head bound, racing, torchrun exchange); ShortGPT."""
