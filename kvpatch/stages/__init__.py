"""Built-in stages: one module per implementation, each registering itself with
`kvpatch.registry.register_stage`. Every module here is imported by the registry on first use."""
