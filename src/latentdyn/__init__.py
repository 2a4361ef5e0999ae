"""latentdyn: autoregressive dynamics of continuous audio-codec latents."""

__version__ = "0.1.0"
