"""Follow generate_ids's model through the code (issue 19's measure): the functions that receive the
model object, in first-call order; stops, modules, moves back to a module already left, entries per
module.

    PYTHONPATH=. python examples/perf/walk_generate_ids.py
"""
import sys, collections
import refusion_mlx
from refusion_mlx import load
model, tok = load()
ids = tok.encode("What is 682 + 459? Work column by column.")
from refusion_mlx import generate_ids
seen, order = set(), []
def prof(frame, event, arg):
    if event != "call":
        return
    mod = frame.f_globals.get("__name__") or ""
    if not mod.startswith("refusion_mlx"):
        return
    code = frame.f_code
    args = [frame.f_locals.get(n) for n in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
    if not any(a is model for a in args):
        return
    key = (mod, code.co_name)
    if key not in seen:
        seen.add(key); order.append(key)
sys.setprofile(prof)
generate_ids(model, ids, gen_length=32, mask_id=model.args.mask_token_id)
sys.setprofile(None)
mods = [m for m, _ in order]
path = [m for i, m in enumerate(mods) if i == 0 or m != mods[i - 1]]
back = sum(1 for i, m in enumerate(path) if m in path[:i])
print("stops", len(order), "modules", len(set(mods)), "moves back", back)
print(collections.Counter(path).most_common())
for m, f in order: print("  ", m, f)
