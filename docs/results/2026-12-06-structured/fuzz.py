from pathlib import Path as _P
REPO = _P(__file__).resolve().parents[3]
import sys, json, random
import numpy as np, llguidance, llguidance.numpy, llama_cpp, jsonschema
sys.path.insert(0, str(REPO / "service"))
from innova_smollm.engine.grammar import Constraints
llm = llama_cpp.Llama(str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"), n_ctx=64, verbose=False, vocab_only=True)
c = Constraints(llama_cpp.llama_model_get_vocab(llm.model))
tok = c.tokenizer
rng = random.Random(1)
def walk(grammar, schema, n=150):
    bad = 0; done = 0
    for i in range(n):
        m = c.matcher(grammar); out = []
        mask = llguidance.numpy.allocate_token_bitmask(1, c.n_vocab)
        for step in range(80):
            llguidance.numpy.fill_next_token_bitmask(m, mask)
            bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")[: c.n_vocab]
            allowed = np.flatnonzero(bits)
            eos = [t for t in tok.eos_tokens if bits[t]]
            if eos and (step > 10 or len(allowed) == len(eos)) and rng.random() < 0.5:
                break
            non = [t for t in allowed if t not in tok.eos_tokens]
            if not non: break
            t = int(rng.choice(non)); assert m.consume_token(t); out.append(t)
            if m.is_stopped(): break
        else:
            continue
        done += 1
        text = tok.decode_str(out)
        try: jsonschema.validate(json.loads(text), schema)
        except Exception as e: bad += 1; print("   INVALID", repr(text)[:120], str(e)[:80])
    return done, bad
for s in [{"type":"integer","minimum":3,"maximum":17}, {"type":"number","minimum":0.5,"maximum":3},{"type":"number","exclusiveMinimum":0,"exclusiveMaximum":1},
          {"type":"integer","exclusiveMinimum":-5, "exclusiveMaximum":5}, {"type":"integer","multipleOf":3}, {"type":"number","multipleOf":0.5},
          {"type":"string","pattern":"^[a-c]+x$"}, {"type":"string","pattern":"ab"}, {"type":"integer","minimum":-100}]:
    g = c.json_schema(s)
    print(json.dumps(s), walk(g, s))
