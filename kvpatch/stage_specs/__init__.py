"""Declarations of the built-in stages: each one's Params model, its facts (lossless, requires,
builds_layers) and where it is implemented, one module per module of `kvpatch/stages/`.

Torch-free (pydantic, `kvpatch.params`, `kvpatch.registry` only), so that `load_config` and
`kvpatch validate` check a config without importing an implementation. Every module here is
imported by the registry on first use."""
