"""Steps that experiment pipelines compose (DESIGN §2): prepare corpus / splits / latent store, train a dynamics
model, run the Phase 1 battery and the injection diagnostic, resolve a checkpoint to its store, decode audio.

Arrows point one way: ``experiments -> pipeline -> diagnostics, models, representations, data, tracking``. An
experiment module imports steps from here, never another experiment.
"""
