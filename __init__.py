"""draftsmith: train, export and measure drafters for lossless speculative decoding."""
__version__ = "0.1.0"
