"""Split-count sweep of the fused kernel over a static full-precision buffer (1B Llama heads:
32 q / 8 kv, d=64), B in {1, 8}, T in {8K, 32K}: which split policy a dense decode step wants."""
import json
import torch
from kvpatch.kernels.packed import PackedKV
from kvpatch.kernels.decode_tuning import DecodeTuning
from kvpatch.kernels.triton_decode import decode_attention

rows = []
for batch in (1, 8):
    for context in (8192, 32768):
        cap = context + 1024
        k = torch.randn(batch, 8, cap, 64, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        kv = PackedKV(k, v, counts=torch.tensor([0, 0, context], device="cuda"), host_counts=(0, 0, context))
        q = torch.randn(batch, 32, 1, 64, device="cuda", dtype=torch.bfloat16)
        for splits in (4, 8, 16, 24, 32, 48, 64, 96, 133):
            for bn in (64, 128):
                fn = lambda: decode_attention(q, kv, 0.125, tuning=DecodeTuning(num_splits=splits, block_n=bn))
                for _ in range(3):
                    fn()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(20):
                        fn()
                g.replay(); torch.cuda.synchronize()
                s, e = torch.cuda.Event(True), torch.cuda.Event(True)
                s.record(); g.replay(); e.record(); torch.cuda.synchronize()
                ms = s.elapsed_time(e) / 20
                gbps = 2 * batch * 8 * context * 64 * 2 / ms / 1e6
                rows.append(dict(batch=batch, context=context, splits=splits, block_n=bn, ms=ms, tb_per_s=gbps / 1e3))
                print(json.dumps(rows[-1]), flush=True)
