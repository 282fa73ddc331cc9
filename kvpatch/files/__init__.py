"""Files kvpatch writes and reads: safetensors bytes checked before use, atomic writes, and the
folders that hold them (temp files of dead writers, regular files only). Used by snapshots and by
the chunk store's disk tier alike, so it imports neither."""
