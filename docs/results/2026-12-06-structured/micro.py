from pathlib import Path as _P
REPO = _P(__file__).resolve().parents[3]
import sys, time, json, ctypes
sys.path.insert(0, str(REPO / "scripts")); sys.path.insert(0, str(REPO / "service"))
import numpy as np, llama_cpp
from bench_structured import PLAN_SCHEMA
from innova_smollm.core.schema import check_schema
from innova_smollm.engine.grammar import json_schema_gbnf
from innova_smollm.engine.sampling import new_grammar, TOKEN_DATA
import llguidance, llguidance.numpy
from llguidance.llamacpp import lltokenizer_from_vocab

llm = llama_cpp.Llama(sys.argv[1] if len(sys.argv)>1 else str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"), n_ctx=256, verbose=False)
vocab = llama_cpp.llama_model_get_vocab(llm.model)
n_vocab = llm.n_vocab()
answer = json.dumps({"need": "a new oven for the bakery", "priority": "high", "budget": 5000.5, "urgent": True,
    "actions": [{"verb": "call", "days": 2}, {"verb": "visit", "days": 10}]})
toks = llm.tokenize(answer.encode(), add_bos=False, special=False)
print("answer tokens", len(toks), "vocab", n_vocab)
schema = check_schema(PLAN_SCHEMA, field="x")
g = json_schema_gbnf(schema)
# llama.cpp grammar
data = np.zeros(n_vocab, dtype=TOKEN_DATA); data["id"] = np.arange(n_vocab)
arr = llama_cpp.llama_token_data_array(data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab, selected=-1, sorted=False)
one = np.zeros(1, dtype=TOKEN_DATA)
onea = llama_cpp.llama_token_data_array(data=one.ctypes.data_as(llama_cpp.llama_token_data_p), size=1, selected=-1, sorted=False)
gr = new_grammar(vocab, g)
t_one=t_full=t_acc=0.0
for t in toks:
    one["id"][0]=t; one["logit"][0]=1.0; onea.size=1
    s=time.perf_counter(); llama_cpp.llama_sampler_apply(gr, ctypes.pointer(onea)); t_one+=time.perf_counter()-s
    assert np.isfinite(one["logit"][0]), t
    data["logit"]=1.0; arr.size=n_vocab
    s=time.perf_counter(); llama_cpp.llama_sampler_apply(gr, ctypes.pointer(arr)); t_full+=time.perf_counter()-s
    s=time.perf_counter(); llama_cpp.llama_sampler_accept(gr, t); t_acc+=time.perf_counter()-s
n=len(toks)
print(f"llama.cpp grammar per token: apply-one {t_one/n*1e3:.3f} ms, apply-full-vocab {t_full/n*1e3:.2f} ms, accept {t_acc/n*1e3:.3f} ms")
s=time.perf_counter(); gr2=new_grammar(vocab,g); print(f"llama.cpp grammar init {1e3*(time.perf_counter()-s):.1f} ms")
# llguidance
s=time.perf_counter(); tok = lltokenizer_from_vocab(vocab); print(f"LLTokenizer build {time.perf_counter()-s:.2f} s")
s=time.perf_counter(); grammar = llguidance.LLMatcher.grammar_from_json_schema(PLAN_SCHEMA, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
m = llguidance.LLMatcher(tok, grammar); print(f"matcher init {1e3*(time.perf_counter()-s):.1f} ms", m.get_error())
mask = llguidance.numpy.allocate_token_bitmask(1, n_vocab)
t_mask=t_cons=t_ff=0.0; nff=0
i=0
while i < len(toks):
    s=time.perf_counter(); llguidance.numpy.fill_next_token_bitmask(m, mask); t_mask+=time.perf_counter()-s
    t=toks[i]
    assert (mask[0, t//32] >> (t%32)) & 1, (i, tok.dbg_tokens([t]))
    s=time.perf_counter(); ok=m.consume_token(t); t_cons+=time.perf_counter()-s
    assert ok, m.get_error()
    s=time.perf_counter(); ff=m.compute_ff_tokens(); t_ff+=time.perf_counter()-s
    i+=1
    if ff: nff+=1
print(f"llguidance per token: mask {t_mask/n*1e3:.3f} ms, consume {t_cons/n*1e3:.3f} ms, ff {t_ff/n*1e3:.3f} ms; ff nonempty at {nff}/{n} steps")
# how many tokens could be forced on a greedy-ish path: replay with ff
m.reset(); forced=0; i=0; sampled=0
print(tok.dbg_tokens(toks))
while i < len(toks):
    ff = m.compute_ff_tokens()
    if ff:
        print("ff", tok.dbg_tokens(ff), "model:", tok.dbg_tokens(toks[i:i+len(ff)]))
    m.consume_token(toks[i]); i+=1
