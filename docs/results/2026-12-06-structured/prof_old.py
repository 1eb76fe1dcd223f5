"""Profile today's constrained path: time per token in each part of Candidates.sample, counted by branch."""
from pathlib import Path as _P
REPO = _P(__file__).resolve().parents[3]

import sys, time, statistics, collections
sys.path.insert(0, str(REPO / "scripts"))
import bench_structured as bs
from innova_smollm.engine import sampling, scheduler
import llama_cpp
T = collections.defaultdict(float); N = collections.Counter()
def timed(name, f):
    def w(*a, **k):
        s = time.perf_counter(); r = f(*a, **k); T[name] += time.perf_counter() - s; N[name] += 1; return r
    return w
C = sampling.Candidates
orig_sample = C.sample
C._fill = timed("fill_full_vocab", C._fill)
C._pick = timed("chain_pick", C._pick)
C._shortlisted = timed("shortlist_pass", C._shortlisted)
C.sample = timed("sample_total", C.sample)
real_apply = llama_cpp.llama_sampler_apply
sampling.llama_cpp = type(sys)("lc"); sampling.llama_cpp.__dict__.update(llama_cpp.__dict__)
def apply(s, arr):
    n = arr.contents.size
    key = "grammar_or_chain_apply_1" if n == 1 else "apply_full" if n > 4096 else "apply_short"
    st = time.perf_counter(); real_apply(s, arr); T[key] += time.perf_counter() - st; N[key] += 1
sampling.llama_cpp.llama_sampler_apply = apply
sampling.llama_cpp.llama_sampler_accept = timed("accept", llama_cpp.llama_sampler_accept)
scheduler.llama_cpp.llama_decode = timed("decode", llama_cpp.llama_decode)
import argparse
for temp in (0.0, 0.8):
    args = argparse.Namespace(max_tokens=160, temperature=temp)
    from innova_smollm.settings import Settings
    from innova_smollm.engine.scheduler import GGUFEngine
    from innova_smollm.core.service import ModelService
    settings = Settings.from_env({"SMOLLM_MODEL_PATH": str(bs.DEFAULT_MODEL), "SMOLLM_N_THREADS": "2", "SMOLLM_PARALLEL": "4", "SMOLLM_N_CTX": "1024"})
    engine = GGUFEngine(settings); service = ModelService(settings, engine=engine)
    bs.run(service, 1, True, args, 99)
    for constrained in (True, False):
        T.clear(); N.clear(); toks = 0; speeds = []; valid = 0
        wall = time.perf_counter()
        for r in range(6):
            for o in bs.run(service, 1, constrained, args, r):
                toks += o.completion_tokens; speeds.append(o.tokens_per_second or 0); valid += bs.valid(o) if constrained else 0
        wall = time.perf_counter() - wall
        print(f"\nT={temp} constrained={constrained}: {toks} tokens, median {statistics.median(speeds):.1f} tok/s, valid {valid}/6, wall {wall:.1f}s")
        for k in sorted(T, key=T.get, reverse=True):
            print(f"  {k:28s} calls {N[k]:6d} total {T[k]*1e3:8.1f} ms  per answer-token {T[k]/max(toks,1)*1e3:.3f} ms")
    engine.close()
