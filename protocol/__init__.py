"""The decoding protocol: the types a proposer (models/) and the decoder (eval/) share.

proposer.py (DecodeState, Sampler, the Proposer interface), drafting.py (Draft, TreeShape, DraftSampler,
grow_draft), tree.py (draft trees as parents lists, the tree attention mask), sampling.py (Sampling, warp,
sample). It sits below models/ and eval/ and imports neither (the layers: pyproject.toml, importlinter).
"""
