from pathlib import Path as _P
REPO = _P(__file__).resolve().parents[3]
import sys, time, statistics, json
from pathlib import Path
sys.path.insert(0, str(REPO / "scripts"))
from bench_structured import PLAN_SCHEMA, MESSAGES
from innova_smollm.core.schema import json_schema_constraint
from innova_smollm.core.service import ModelService, RequestOptions
from innova_smollm.core.types import ChatMessage
from innova_smollm.engine.scheduler import GGUFEngine
from innova_smollm.settings import Settings
import jsonschema
MODEL = str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT = [ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES]
def main(T, N, rounds=6):
    settings = Settings.from_env({"SMOLLM_MODEL_PATH": MODEL, "SMOLLM_N_THREADS": "2", "SMOLLM_PARALLEL": "4", "SMOLLM_N_CTX": "1024"})
    engine = GGUFEngine(settings); service = ModelService(settings, engine=engine)
    try:
        for temp in (0.0, 0.8):
            opts = lambda seed: RequestOptions(max_tokens=160, temperature=temp, seed=seed, constraint=json_schema_constraint(PLAN_SCHEMA, field="schema"))
            service.run_blocking(service.prepare_chat(PROMPT, opts(0)))
            T.clear(); N.clear(); toks = 0; valid = 0; speeds = []
            for r in range(rounds):
                o = service.run_blocking(service.prepare_chat(PROMPT, opts(r + 1)))
                toks += o.completion_tokens; speeds.append(o.tokens_per_second or 0)
                try:
                    jsonschema.validate(json.loads(o.text), PLAN_SCHEMA); valid += o.finish_reason.value == "stop"
                except Exception: pass
                if r == 0: print(repr(o.text))
            print(f"\nT={temp}: {toks} tokens in {rounds} answers, median {statistics.median(speeds):.1f} tok/s, valid {valid}/{rounds}")
            for k in sorted(T, key=T.get, reverse=True):
                print(f"  {k:46s} calls {N[k]:6d} total {T[k]*1e3:8.1f} ms  per answer-token {T[k]/max(toks,1)*1e3:.3f} ms")
    finally:
        engine.close()
