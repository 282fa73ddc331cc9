"""Chunk-level K/V reuse across requests: chunking, hashing, matching, seam repair, chunk stores."""
