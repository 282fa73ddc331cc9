"""Built-in stage implementations: each class registers with `kvpatch.registry.register_stage`
under its declaration in `kvpatch/stage_specs/` (a module of the same name). The registry imports
a module here when one of its stages is first built; validating a config never does."""
