"""Profile the llguidance path in process: time per token in constrained sampling and in jump-forward."""
import sys, time, statistics, collections, argparse
sys.path.insert(0, str(_P(__file__).resolve().parent))
import prof_common as pc
from innova_smollm.engine import sampling, scheduler
import llama_cpp
T = collections.defaultdict(float); N = collections.Counter()
def timed(name, f):
    def w(*a, **k):
        s = time.perf_counter(); r = f(*a, **k); T[name] += time.perf_counter() - s; N[name] += 1; return r
    return w
sampling.Candidates.sample = timed("sample (mask + pick)", sampling.Candidates.sample)
scheduler.GGUFEngine._deliver_constrained = timed("deliver_constrained (consume + ff + deliver)", scheduler.GGUFEngine._deliver_constrained)
scheduler.GGUFEngine._deliver = timed("deliver (one token)", scheduler.GGUFEngine._deliver)
scheduler.GGUFEngine._step = timed("step (whole)", scheduler.GGUFEngine._step)
scheduler.llama_cpp.llama_decode = timed("llama_decode", llama_cpp.llama_decode)
pc.main(T, N)
